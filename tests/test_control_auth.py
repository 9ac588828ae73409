"""The control endpoint answers only who holds the node's token (issue 12, item 9;
docs/security.md): the seal (transport/seal.py, pure), the token files
(engine/client/tokens.py, engine/node/auth.py), and a node refusing callers without
the token, with a wrong one, or replaying a captured frame — with a typed error, not a
hang; the CLI and engine.client.connect on the node's host need no flags."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.app import App
from engine.manifest import load_manifest
from engine.node.node import Node
from support import free_tcp_port, start_node_process, stop_node, wait_until
from transport.codec import Kind, decode_lists, encode_envelope, join_frame
from transport.errors import CodecError, HandlerError, Unauthorized
from transport.rpc import RpcClient
from transport.rpc.handlers import Refused

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo"


@pytest.fixture(autouse=True)
def token_home(tmp_path, monkeypatch) -> Path:
    """This test's own token folder (as if its own user's), and no token in the
    environment: what a node makes and a client finds stays here."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for name in ("ENGINE_NODE_TOKEN", "ENGINE_TOKEN_FILE", "ENGINE_NODE"):
        monkeypatch.delenv(name, raising=False)
    return home


def request_frame(sid: int, target: str, event: str, payload=None) -> bytes:
    return join_frame([encode_envelope(Kind.REQUEST, sid, [target, event, payload])])


# -- the seal (pure) ------------------------------------------------------------------------

def _pair(secret: bytes = b"s" * 32, clock=None):
    from transport.seal import SealedClient, SealGate, SealKey

    key = SealKey.from_secret(secret)
    kw = {} if clock is None else {"clock": clock}
    return SealedClient(key, **kw), SealGate([key], **kw)


def test_a_sealed_frame_opens_once_and_only_under_its_key():
    from transport.seal import SealedClient, SealKey

    client, gate = _pair()
    plain = request_frame(1, "", "deploy", {"path": "/x"})
    sealed = client.seal(plain)
    assert sealed != plain and sealed[37:-16] == plain
    inner, guard = gate.open(sealed)
    assert inner == plain and guard is not None
    with pytest.raises(Refused, match="replay") as replay:      # the same bytes again
        gate.open(sealed)
    assert replay.value.frame == plain and isinstance(replay.value.error, Unauthorized)
    other = SealedClient(SealKey.from_secret(b"t" * 32)).seal(plain)
    with pytest.raises(Refused, match="another token") as wrong:
        gate.open(other)
    assert decode_lists(wrong.value.frame)[0][1] == 1          # readable: answered per sid
    tampered = bytearray(client.seal(plain))
    tampered[-20] ^= 1
    with pytest.raises(Refused, match="does not verify"):
        gate.open(bytes(tampered))
    assert gate.open(plain) == (plain, None)                   # plain: let in, unsealed
    with pytest.raises(CodecError):
        gate.open(bytes([0xC1]) + b"short")
    assert gate.refused == 3


def test_answers_are_sealed_and_a_client_takes_only_errors_unsealed():
    client, gate = _pair()
    _, guard = gate.open(client.seal(request_frame(1, "", "list")))
    answer = join_frame([encode_envelope(Kind.RESULT, 1, {"apps": {}})])
    assert client.open(guard.seal(answer)) == answer
    with pytest.raises(CodecError):
        client.open(answer)                  # an unsealed RESULT: anyone could have sent it
    refusal = join_frame([encode_envelope(Kind.ERROR, 1, {"code": "unauthorized"})])
    assert client.open(refusal) == refusal   # how a node that cannot verify us says why
    with pytest.raises(CodecError):          # a client's own frame sent back is no answer
        client.open(client.seal(answer))


def test_a_frame_outside_the_clock_window_is_refused():
    now = [1_000_000.0]
    client, gate = _pair(clock=lambda: now[0])
    old = client.seal(request_frame(1, "", "deploy"))
    now[0] += 31
    with pytest.raises(Refused, match="outside the 30 s"):
        gate.open(old)
    assert gate.open(client.seal(request_frame(2, "", "list")))[1] is not None


def test_a_frame_sealed_by_an_older_engine_is_refused_saying_so():
    # Seal v1 (keyed BLAKE2b, another key derivation): a client or node not yet
    # updated is told that, not that it holds the wrong token.
    import hashlib
    import hmac
    import struct

    from transport.seal import SealKey

    secret = b"s" * 32
    client, gate = _pair(secret)
    base = hmac.digest(secret, b"engine-trio sealed frames v1:control", "sha256")
    v1_id = hashlib.sha256(b"key id:" + base).digest()[:4]
    assert SealKey.from_secret(secret).v1_id == v1_id != SealKey.from_secret(secret).id
    key = hmac.digest(base, b"to server", "sha256")
    head = struct.pack(">B4s16sQQ", 0xC1, v1_id, b"\1" * 16, 1, 0) + request_frame(1, "", "list")
    v1_frame = head + hashlib.blake2b(head, key=key, digest_size=16).digest()
    with pytest.raises(Refused, match="older engine"):
        gate.open(v1_frame)


def test_no_two_senders_share_a_key_so_no_nonce_repeats_under_one():
    # The tag is ChaCha20-Poly1305's over the frame, the counter its nonce: safe only
    # while a (key, nonce) pair is never used twice.  Every sender counts from 1, so
    # each must have a key of its own (derived from its random id): a sender's tag
    # verifies under its own key and not under another sender's of the same token.
    from cryptography.exceptions import InvalidTag

    from transport.seal import SealKey, Sender, sender_mac

    key = SealKey.from_secret(b"s" * 32)
    a, b = Sender(key.id, key.to_server), Sender(key.id, key.to_server)
    frame = request_frame(1, "", "list")
    sealed_a, sealed_b = a.seal(frame), b.seal(frame)
    nonce = bytes(4) + (1).to_bytes(8, "big")          # both counter 1
    assert sealed_a[21:29] == sealed_b[21:29] == nonce[4:]
    assert sender_mac(key.to_server, a.id).decrypt(nonce, sealed_a[-16:], sealed_a[:-16]) == b""
    with pytest.raises(InvalidTag):
        sender_mac(key.to_server, b.id).decrypt(nonce, sealed_a[-16:], sealed_a[:-16])
    client, gate = _pair()
    forged = sealed_b[:-16] + sealed_a[-16:]
    with pytest.raises(Refused, match="another token|does not verify"):
        gate.open(forged)


def test_a_receiver_keeps_a_bounded_number_of_senders_keys(monkeypatch):
    import transport.seal

    monkeypatch.setattr(transport.seal, "SENDER_KEYS", 8)
    _, gate = _pair()
    for _ in range(50):                      # 50 senders, each a key of its own
        client, _ = _pair()
        assert gate.open(client.seal(request_frame(1, "", "list")))[1] is not None
    assert len(gate._opener._macs) <= 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=120), st.booleans())
def test_a_sealed_frame_is_never_taken_twice(order, in_order):
    """Frames delivered any number of times: none is let in twice, each refusal is a
    readable ``Refused`` saying "replay"; delivered in the order they were sealed (as
    one connection delivers them), each is let in the first time."""
    if in_order:
        order = sorted(order)
    client, gate = _pair()
    frames = [client.seal(request_frame(i + 1, "", "list")) for i in range(41)]
    taken: set[int] = set()
    for i in order:
        try:
            inner, _ = gate.open(frames[i])
        except Refused as exc:
            assert "replay" in exc.error.message and decode_lists(exc.frame)[0][1] == i + 1
            assert i in taken or not in_order
        else:
            assert i not in taken and decode_lists(inner)[0][1] == i + 1
            taken.add(i)
    if in_order:
        assert taken == set(order)


# -- token files --------------------------------------------------------------------------

def test_a_node_makes_its_token_file_private_and_keeps_it(token_home):
    from engine.client.tokens import find_token, token_path
    from engine.node.auth import ControlAuth, NodeToken

    address = "tcp://127.0.0.1:9555"
    first = NodeToken(ControlAuth()).before_bind(address)
    path = token_path(address)
    assert path == token_home / "engine-trio" / "tokens" / "tcp-9555"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert NodeToken(ControlAuth()).before_bind(address).secret == first.secret   # kept
    # a client of that node, on any host name of it, finds the same token
    assert find_token("tcp://localhost:9555").secret == first.secret
    assert token_path("tcp://0.0.0.0:9555") == path and token_path("nng+tcp://[::1]:9555") == path
    assert token_path("ipc:///tmp/a.sock") != token_path("ipc:///tmp/b.sock")
    assert first.secret not in repr(first).encode()


def test_a_token_file_others_may_read_is_refused(tmp_path):
    from engine.client.tokens import TokenError
    from engine.node.auth import ControlAuth, NodeToken

    loose = tmp_path / "token"
    loose.write_text("x" * 40 + "\n")
    loose.chmod(0o644)
    with pytest.raises(TokenError, match="read by others.*chmod 600"):
        NodeToken(ControlAuth(token_file=loose)).before_bind("tcp://127.0.0.1:9556")
    with pytest.raises(TokenError, match="at least 16"):
        NodeToken(ControlAuth(token="short")).before_bind("tcp://127.0.0.1:9556")


def test_beyond_loopback_a_node_must_be_given_its_token(tmp_path, token_home):
    from engine.client.tokens import TokenError, read_token, token_path
    from engine.node.auth import ControlAuth, NodeToken, is_local

    assert is_local("tcp://127.0.0.1:1") and is_local("tcp://localhost:1") and is_local("ipc:///x")
    assert is_local("tcp://[::1]:1") and not is_local("tcp://0.0.0.0:1")
    assert not is_local("tcp://10.1.2.3:1") and not is_local("nng+tcp://*:1")
    with pytest.raises(TokenError, match="not loopback.*--token-file"):
        NodeToken(ControlAuth()).before_bind("tcp://0.0.0.0:9557")
    assert not (token_home / "engine-trio").exists()          # nothing made for it
    given_file = tmp_path / "keys" / "node.token"
    keeper = NodeToken(ControlAuth(token_file=given_file))
    token = keeper.before_bind("tcp://0.0.0.0:9557")          # made where it was told
    assert stat.S_IMODE(given_file.stat().st_mode) == 0o600
    assert keeper.after_bind("tcp://0.0.0.0:9557") == given_file
    # the CLI on this host finds it through the address's file, a link to the given one
    assert token_path("tcp://127.0.0.1:9557").is_symlink()
    assert read_token(token_path("tcp://127.0.0.1:9557")).secret == token.secret
    assert NodeToken(ControlAuth(token="y" * 20)).before_bind("tcp://0.0.0.0:9557").secret == b"y" * 20


def test_a_token_given_in_code_is_left_for_the_hosts_clients_one_from_the_environment_is_not():
    from engine.client.tokens import find_token, token_path
    from engine.node.auth import ControlAuth, NodeToken

    given = NodeToken(ControlAuth(token="g" * 20))
    given.before_bind("tcp://127.0.0.1:9560")
    assert given.after_bind("tcp://127.0.0.1:9560") == token_path("tcp://127.0.0.1:9560")
    assert find_token("tcp://127.0.0.1:9560").secret == b"g" * 20   # its slaves' too
    from_env = NodeToken(ControlAuth.from_env({"ENGINE_NODE_TOKEN": "e" * 20}))
    assert from_env.before_bind("tcp://127.0.0.1:9561").source == "ENGINE_NODE_TOKEN"
    assert from_env.after_bind("tcp://127.0.0.1:9561") is None
    assert not token_path("tcp://127.0.0.1:9561").exists()
    with pytest.raises(Exception, match="white space"):
        NodeToken(ControlAuth(token="two words and more")).before_bind("tcp://127.0.0.1:9562")


def test_an_ephemeral_port_gets_a_fresh_token_removed_when_the_node_stops():
    from engine.client.tokens import read_token, token_path
    from engine.node.auth import ControlAuth, NodeToken

    stale = token_path("tcp://127.0.0.1:9558")
    stale.parent.mkdir(parents=True, mode=0o700)
    stale.write_text("an old token of a node killed on this port\n")
    keeper = NodeToken(ControlAuth())
    token = keeper.before_bind("tcp://127.0.0.1:0")
    assert keeper.after_bind("tcp://127.0.0.1:9558") == stale
    assert read_token(stale).secret == token.secret
    keeper.close()
    assert not stale.exists()


def test_where_a_client_finds_the_token(tmp_path, monkeypatch):
    from engine.client.tokens import TokenError, find_token, token_path

    address = "tcp://127.0.0.1:9559"
    assert find_token(address) is None
    path = token_path(address)
    path.parent.mkdir(parents=True)
    path.write_text("f" * 32 + "\n")
    assert find_token(address).secret == b"f" * 32
    monkeypatch.setenv("ENGINE_NODE_TOKEN", "e" * 32)
    assert find_token(address).secret == b"e" * 32               # the environment's
    monkeypatch.setenv("ENGINE_NODE", "tcp://127.0.0.1:1")       # ... is ENGINE_NODE's only
    assert find_token(address).secret == b"f" * 32
    assert find_token("tcp://127.0.0.1:1").secret == b"e" * 32
    assert find_token(address, token="a" * 32).secret == b"a" * 32
    with pytest.raises(TokenError, match="cannot read the token file"):
        find_token(address, token_file=tmp_path / "missing")


# -- a node refuses who lacks the token ------------------------------------------------------

def _app(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "app.py").write_text("")
    (folder / "manifest.json").write_text(json.dumps({}))
    return folder


class _Pool:
    def __init__(self, manifest):
        pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.sleep_forever()

    def use_zygote(self, zygote):
        pass

    async def drain(self, timeout):
        pass

    def info(self):
        return {"state": "running"}


def _fake_app(manifest):
    return App(manifest, pool_factory=_Pool)


async def _node(nursery, tmp_path) -> Node:
    node = Node(control="tcp://127.0.0.1:0", app_factory=_fake_app)
    await nursery.start(node.run)
    await node.deploy(load_manifest(_app(tmp_path / "apps", "echo")))
    return node


@pytest.mark.e2e
async def test_without_the_token_only_read_only_verbs_are_answered(tmp_path):
    """The defect: ``deploy`` of a folder (code execution) from anyone who could reach
    the endpoint.  Now a caller without the token is told what is missing, at once."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            node = await _node(nursery, tmp_path)
            later = _app(tmp_path, "later")
            async with RpcClient(node.control_address, timeout=5) as plain:
                assert set((await plain.call("", "list"))["apps"]) == {"echo"}
                assert (await plain.call("", "info"))["state"] == "running"
                for target, event, args in (("", "deploy", {"path": str(later)}),
                                            ("", "undeploy", {"app": "echo"}),
                                            ("", "crashlog", {"app": "echo"}),
                                            ("echo", "echo", 1)):
                    with pytest.raises(Unauthorized) as refused:
                        await plain.call(target, event, args)
                    assert "needs this node's token" in str(refused.value)
                    assert "docs/security.md" in str(refused.value)
            assert set(node.apps) == {"echo"}
            await node.shutdown()


@pytest.mark.e2e
async def test_a_wrong_token_is_refused_with_a_typed_error_not_a_hang(tmp_path):
    from transport.seal import SealedClient, SealKey

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            node = await _node(nursery, tmp_path)
            wrong = SealedClient(SealKey.from_secret(b"not the node's token, at all"))
            async with RpcClient(node.control_address, timeout=5, guard=wrong) as client:
                for event in ("list", "deploy"):
                    with pytest.raises(Unauthorized, match="another token"):
                        await client.call("", event, {"path": str(_app(tmp_path, event))})
            assert set(node.apps) == {"echo"}
            await node.shutdown()


@pytest.mark.e2e
async def test_on_the_nodes_host_connect_needs_no_token_argument(tmp_path):
    from engine.client import connect

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            node = await _node(nursery, tmp_path)
            async with connect(node.control_address, timeout=5) as client:
                assert (await client.deploy(_app(tmp_path, "later")))["app"] == "later"
                assert (await client.undeploy("later", drain=0.1))["state"] == "stopped"
            await node.shutdown()


class _Recorder:
    """A client guard that keeps a copy of every sealed frame it sends (an eavesdropper)."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []

    def seal(self, frame):
        sealed = self.inner.seal(frame)
        self.sent.append(sealed)
        return sealed

    def open(self, frame):
        return self.inner.open(frame)


@pytest.mark.e2e
async def test_a_captured_deploy_frame_cannot_be_replayed(tmp_path):
    from engine.client.tokens import control_guard
    from transport.streams import FramedStream

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            node = await _node(nursery, tmp_path)
            address = node.control_address
            recorder = _Recorder(control_guard(address))
            later = _app(tmp_path, "later")
            async with RpcClient(address, timeout=5, guard=recorder) as client:
                await client.call("", "deploy", {"path": str(later)})
                await client.call("", "undeploy", {"app": "later", "drain": 0})
            captured = recorder.sent[0]
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            stream = FramedStream(await trio.open_tcp_stream(host, int(port)))
            await stream.send(captured)                     # the deploy, once more
            [[kind, sid, body]] = decode_lists(await stream.recv())
            stream.close()
            assert (kind, sid, body["code"]) == (Kind.ERROR, 1, "unauthorized")
            assert "replay" in body["message"]
            assert "later" not in node.apps
            await node.shutdown()


# -- the command line -----------------------------------------------------------------------

@pytest.mark.e2e
def test_a_node_will_not_listen_beyond_loopback_without_a_token(tmp_path):
    """``--control tcp://0.0.0.0:P`` used to serve anyone (an INFO line said so); now
    the node refuses to start, says why and how, and exits non-zero, having bound nothing."""
    port = free_tcp_port()
    try:
        done = subprocess.run([sys.executable, "-m", "engine", "run", "--control",
                               f"tcp://0.0.0.0:{port}"], capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the node started serving tcp://0.0.0.0 with no token")
    assert done.returncode != 0
    assert "not loopback" in done.stderr and "--token-file" in done.stderr, done.stderr
    assert "docs/security.md" in done.stderr


@pytest.mark.e2e
async def test_the_cli_on_the_nodes_host_needs_no_flags_and_a_stranger_is_refused(
        tmp_path, token_home):
    node = await start_node_process([], tmp_path / "node.log", tmp_path)
    try:
        app = tmp_path / "echo"
        import shutil
        shutil.copytree(ECHO, app, ignore=shutil.ignore_patterns("__pycache__"))
        done = await node.cli("deploy", str(app))
        assert done.returncode == 0, done.stderr
        # a stranger: another user's token folder, so no token of this node
        stranger = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "stranger"))

        async def as_stranger(*args: str) -> subprocess.CompletedProcess:
            with trio.fail_after(40):
                return await trio.run_process(
                    [sys.executable, "-m", "engine", *args, "--node", node.address,
                     "--timeout", "20"], capture_stdout=True, capture_stderr=True,
                    check=False, env=stranger)

        refused = await as_stranger("call", "echo", "echo", "1")
        assert refused.returncode == 1
        assert b"Unauthorized" in refused.stderr and b"docs/security.md" in refused.stderr
        refused = await as_stranger("undeploy", "echo")
        assert refused.returncode == 1 and b"Unauthorized" in refused.stderr
        listed = await as_stranger("list")
        assert listed.returncode == 0 and b"echo" in listed.stdout
        token_file = next((token_home / "engine-trio" / "tokens").iterdir())
        given = await as_stranger("call", "echo", "echo", "2", "--token-file", str(token_file))
        assert given.returncode == 0 and given.stdout.strip() == b"2", given.stderr
    finally:
        assert not stop_node(node)
    await wait_until(lambda: not any((token_home / "engine-trio" / "tokens").iterdir()),
                     "the node removes the token it made for its ephemeral port", timeout=10)


# -- a cluster's nodes -------------------------------------------------------------------------

@pytest.mark.e2e
async def test_a_clustered_node_takes_the_cluster_secret_beside_its_token(tmp_path, disco):
    """Peers seal their calls to a node with the cluster's secret (its holders may push
    apps already); anyone else is refused as usual."""
    import uuid

    import time

    from engine.cluster.bundle import make_bundle
    from engine.cluster.catalog import sign_grant
    from engine.manifest import load_manifest
    from engine.cluster.service import ClusterOptions
    from engine.cluster.verbs import in_cluster
    from transport.seal import SealedClient, SealKey

    secret = "a cluster secret of some length"
    options = ClusterOptions(name=f"t-{uuid.uuid4().hex[:8]}", secret=secret,
                             state_dir=tmp_path / "state", discovery=disco)
    node = Node(control="tcp://127.0.0.1:0", app_factory=_fake_app, cluster=in_cluster(options))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            peer = SealedClient(SealKey.from_secret(secret.encode(), b"cluster"))
            async with RpcClient(node.control_address, timeout=5, guard=peer) as client:
                later = _app(tmp_path, "later")
                digest = make_bundle(load_manifest(later), "later")["digest"]
                grant = sign_grant(secret.encode(), "deploy", "later", at=time.time(),
                                   digest=digest).to_wire()
                deployed = await client.call("", "deploy", {"path": str(later), "grant": grant})
                assert deployed["app"] == "later"
            stranger = SealedClient(SealKey.from_secret(b"another cluster's secret", b"cluster"))
            async with RpcClient(node.control_address, timeout=5, guard=stranger) as client:
                with pytest.raises(Unauthorized, match="another token"):
                    await client.call("", "undeploy", {"app": "later"})
            assert "later" in node.apps
            await node.shutdown()


@pytest.mark.e2e
async def test_a_node_of_a_cluster_without_a_secret_stays_on_loopback(tmp_path, disco):
    from engine.client.tokens import TokenError
    from engine.cluster.service import ClusterOptions
    from engine.cluster.verbs import in_cluster
    from engine.node.auth import ControlAuth

    options = ClusterOptions(name="no-secret", insecure=True, state_dir=tmp_path / "state",
                             discovery=disco)
    node = Node(control=f"tcp://0.0.0.0:{free_tcp_port()}", cluster=in_cluster(options),
                auth=ControlAuth(token="a-token-given-to-the-node"))
    with trio.fail_after(15):
        with pytest.raises(TokenError, match="cluster without a secret.*--cluster-secret"):
            await node.run()
    assert node.control_address is None
