"""Bundles are self-contained: what a node ships is its app folder and nothing else (no
file a symlink reaches outside it, no entry outside it), and what a node installs runs
only what the bundle carries (no ``args`` outside the installed folder).  Pure tests on
make_bundle / check_bundle / write_bundle, then the ``cluster.deploy`` verb of a real
(in-process) node."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import trio

from engine.client import connect
from engine.cluster.catalog import AppRecord
from engine.cluster.bundle import BundleError, check_bundle, digest_of, make_bundle, write_bundle
from engine.cluster.service import ClusterOptions
from engine.cluster.verbs import in_cluster
from engine.manifest import load_manifest
from engine.node.node import Node
from transport.errors import HandlerError
from transport.mesh.discovery import DiscoveryConfig
from support import free_udp_port, wait_until
from cluster_support import lan_member, sees_all

SECRET = "the bundle tests' cluster secret"

APP = "from engine import on\n\n@on('echo')\ndef echo(data):\n    return data\n"


def app_folder(where: Path, name: str = "app", args: str = "app.py") -> Path:
    folder = where / name
    (folder / "lib").mkdir(parents=True)
    (folder / "app.py").write_text(APP)
    (folder / "lib" / "util.py").write_text("X = 1\n")
    manifest = {"args": args, "engine": {"backend": "thread"}, "drivers": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bundle_of(manifest: dict, files: dict[str, bytes], name: str = "evil") -> dict:
    return {"name": name, "manifest": manifest, "files": files, "digest": digest_of(manifest, files)}


# -- sending: make_bundle ---------------------------------------------------------------------

def test_a_plain_folder_ships_every_file_but_the_manifest(tmp_path):
    folder = app_folder(tmp_path)
    bundle = make_bundle(load_manifest(folder), "app")
    assert sorted(bundle["files"]) == ["app.py", "lib/util.py"]
    assert check_bundle(bundle) is bundle


def test_a_symlink_to_a_file_outside_the_folder_is_never_shipped(tmp_path):
    folder = app_folder(tmp_path)
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "lib" / "key.pem").symlink_to(key)
    with pytest.raises(BundleError, match=r"lib/key\.pem") as refused:
        make_bundle(load_manifest(folder), "app")
    assert "outside" in str(refused.value) and "PRIVATE KEY" not in str(refused.value)


def test_a_symlinked_folder_leading_outside_is_refused_too(tmp_path):
    folder = app_folder(tmp_path)
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "id_rsa").write_text("secret")
    (folder / "keys").symlink_to(tmp_path / "ssh")
    (folder / "up").symlink_to("..")
    with pytest.raises(BundleError, match=r"'keys'|'up'"):
        make_bundle(load_manifest(folder), "app")


def test_symlinks_that_stay_inside_ship_as_what_they_point_to(tmp_path):
    folder = app_folder(tmp_path)
    (folder / "alias.py").symlink_to("lib/util.py")
    (folder / "dangling").symlink_to(folder / "not-there")   # an editor's lock file, say
    bundle = make_bundle(load_manifest(folder), "app")
    assert bundle["files"]["alias.py"] == b"X = 1\n" and "dangling" not in bundle["files"]


def test_an_app_folder_that_is_itself_a_symlink_ships_normally(tmp_path):
    real = app_folder(tmp_path / "real")
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "app").symlink_to(real)
    bundle = make_bundle(load_manifest(tmp_path / "apps" / "app"), "app")
    assert sorted(bundle["files"]) == ["app.py", "lib/util.py"]


@pytest.mark.parametrize("args", ["../evil.py", "ABS", "local://ABS", "lib/../../evil.py"])
def test_an_app_whose_entry_lies_outside_its_folder_is_not_shared(tmp_path, args):
    (tmp_path / "evil.py").write_text(APP)
    args = args.replace("ABS", str(tmp_path / "evil.py"))
    folder = app_folder(tmp_path, args=args)
    manifest = load_manifest(folder)   # fine on this node: its owner's business
    assert manifest.entry == tmp_path / "evil.py"
    with pytest.raises(BundleError, match="args") as refused:
        make_bundle(manifest, "app")
    assert args in str(refused.value)


# -- receiving: check_bundle, write_bundle ----------------------------------------------------

@pytest.mark.parametrize("args", ["../evil.py", "/etc/x.py", "local:///etc/x.py", "lib/../../evil.py", "..",
                                  "/", "", "lib\\..\\..\\evil.py", "tcp://x", 7, None, "nul\0.py"])
def test_a_received_manifest_whose_args_leave_the_bundle_is_refused(args):
    files = {"app.py": APP.encode(), "lib/util.py": b"X = 1\n"}
    with pytest.raises(BundleError, match="args") as refused:
        check_bundle(bundle_of({"args": args}, files))
    assert repr(args)[:40] in str(refused.value)


@pytest.mark.parametrize("args", ["app.py", "./app.py", "lib/../app.py", "lib", "lib/util.py"])
def test_args_inside_the_bundle_are_fine(args):
    files = {"app.py": APP.encode(), "lib/util.py": b"X = 1\n"}
    assert check_bundle(bundle_of({"args": args}, files))
    assert check_bundle(bundle_of({}, files))   # the default: app.py


def test_a_received_entry_must_be_among_the_files():
    with pytest.raises(BundleError, match="'missing.py'.*not in the bundle"):
        check_bundle(bundle_of({"args": "missing.py"}, {"app.py": b""}))
    with pytest.raises(BundleError, match="not in the bundle"):
        check_bundle(bundle_of({}, {"lib/util.py": b""}))   # the default app.py


@pytest.mark.parametrize("files", [{"a": b"", "a/b.py": b""}, {"x\0y": b""}, {"app.py": b"", "": b""}])
def test_files_that_cannot_be_written_as_given_are_refused(files):
    with pytest.raises(BundleError, match="path"):
        check_bundle(bundle_of({"args": "a/b.py" if "a/b.py" in files else "app.py"}, files))


def test_write_bundle_writes_only_regular_files_inside_its_folder(tmp_path):
    files = {"app.py": APP.encode(), "lib/util.py": b"X = 1\n"}
    folder = write_bundle(check_bundle(bundle_of({"args": "app.py"}, files, name="ok")), tmp_path)
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert written == ["app.py", "lib/util.py", "manifest.json"]
    assert not any(p.is_symlink() for p in folder.rglob("*"))


# -- the verb: a node in a cluster receiving such a bundle ---------------------------------

@pytest.mark.e2e   # a node on loopback (control endpoint, discovery on a port of its own)
@pytest.mark.parametrize("how", ["dotdot", "absolute", "local"])
async def test_cluster_deploy_refuses_a_bundle_whose_entry_is_outside_it(tmp_path, how):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n" + APP)
    args = {"dotdot": "../" * 12 + str(evil).lstrip("/"), "absolute": str(evil), "local": f"local://{evil}"}[how]
    name = f"t-{uuid.uuid4().hex[:8]}"
    options = ClusterOptions(name=name, state_dir=tmp_path / "state", insecure=True,
                             discovery=DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1"))
    node = Node(control="tcp://127.0.0.1:0", cluster=in_cluster(options))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            async with connect(node.control_address, timeout=10) as client:
                bundle = bundle_of({"args": args, "engine": {"backend": "thread"}, "drivers": {}},
                                   {"app.py": APP.encode()})
                with pytest.raises(HandlerError, match="manifest args .*evil.py") as refused:
                    record = AppRecord(bundle["name"], 1, True, 1, bundle["digest"], "elsewhere")
                    await client.verb("cluster.deploy", {"cluster": name, "key": "", "body": {
                        "bundle": bundle, "record": record.to_wire()}})
                assert refused.value.type == "BundleError"
                assert "evil" not in (await client.list())["apps"]
            nursery.cancel_scope.cancel()
    assert not marker.exists()
    assert not list((tmp_path / "state" / "apps").iterdir())   # nothing written either


@pytest.mark.e2e   # two nodes on loopback, in this process (thread backend: no slaves)
async def test_deploy_never_ships_what_a_symlink_reaches_outside_the_app_folder(tmp_path):
    from test_cluster import _heard_every_peer_since

    key = tmp_path / "id_ed25519"
    secret = b"-----BEGIN OPENSSH PRIVATE KEY----- do-not-ship"
    key.write_bytes(secret)
    folder = app_folder(tmp_path / "apps", "keyed")
    (folder / "key.pem").symlink_to(key)
    name, port = f"t-{uuid.uuid4().hex[:8]}", free_udp_port()

    def member(i: int) -> Node:
        return lan_member(tmp_path / f"state{i}", name, port, SECRET)

    async def sees_both(client) -> bool:
        return await sees_all(client, 2)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = member(0), member(1)
            await nursery.start(a.run)
            await nursery.start(b.run)
            async with connect(a.control_address, timeout=10) as ca, \
                    connect(b.control_address, timeout=10) as cb:
                await wait_until(lambda: sees_both(ca), "A sees B", timeout=15, interval=0.05)
                await wait_until(lambda: sees_both(cb), "B sees A", timeout=15, interval=0.05)
                result = await ca.deploy(folder / "manifest.json", cluster_secret=SECRET)
                assert result["app"] == "keyed"                 # here: the owner's own folder
                [outcome] = result["peers"].values()
                assert outcome.startswith("not shared:") and "'key.pem' is a symlink" in outcome, outcome
                # Nor does B pull it from A's reports (A reports no digest for it).
                for _ in range(2):
                    since = trio.current_time()
                    await wait_until(lambda: _heard_every_peer_since(cb, since), "B hears A",
                                     timeout=10, interval=0.05)
                assert "keyed" not in (await cb.list())["apps"]
                assert (await cb.verb("nodes"))["sync_failed"] == {}
            nursery.cancel_scope.cancel()
    shipped = [p for p in (tmp_path / "state1").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert shipped == []
