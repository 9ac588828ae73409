"""Language plugins (issue #14): the manifest's ``type`` picks how slaves start
(engine/languages/).  Parsing is checked here without processes; then real nodes run an
``exec`` program, a plugin installed through the ``engine.languages`` entry-point group,
and refuse a language whose runtime is missing while their other apps run on.  The
languages' full behaviour is tests/conformance/."""
from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from engine import languages
from engine.client import connect
from engine.errors import LanguageUnavailable, ManifestError
from engine.languages import SOCKET, STDIO, Launch
from engine.manifest import parse_manifest
from transport.errors import HandlerError

from support import start_node_process, stop_node, write_app


def parse(tmp_path: Path, **data):
    return parse_manifest({"drivers": {}, **data}, source=tmp_path / "manifest.json")


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- parsing ------------------------------------------------------------------------------

def test_the_built_in_languages_and_their_defaults(tmp_path):
    assert {"python", "exec", "nodejs"} <= set(languages.names())
    (tmp_path / "app.js").write_text("")
    m = parse(tmp_path, type="nodejs")
    assert (m.type, m.entry, m.args) == ("nodejs", tmp_path / "app.js", ())
    executable(tmp_path / "worker", "#!/bin/sh\n")
    m = parse(tmp_path, type="exec", args=["./worker", "--flag", "x"])
    assert (m.entry, m.args) == (tmp_path / "worker", ("--flag", "x"))
    assert m.engine.transport is None                 # the plugin's default: stdio for exec
    assert languages.get("exec").transports[0] == STDIO
    assert languages.get("nodejs").transports[0] == SOCKET


@pytest.mark.parametrize("data, path, words", [
    ({"type": "cobol"}, "type", "one of exec, nodejs, python"),
    ({"type": "exec", "args": ["./missing"]}, "args", "existing"),
    ({"type": "exec", "args": ["./plain"]}, "args", "executable file"),
    ({"type": "exec", "args": []}, "args", "list of strings"),
    ({"type": "exec", "args": ["./worker", 3]}, "args", "list of strings"),
    ({"type": "python", "args": ["app.py", "--x"]}, "args", "takes no arguments"),
    ({"type": "python", "args": "app.py", "engine": {"transport": "stdio"}}, "engine.transport",
     "python plugin speaks: socket"),
    ({"type": "exec", "args": ["./worker"], "engine": {"transport": "pigeon"}}, "engine.transport",
     "one of socket, stdio"),
    ({"type": "exec", "args": ["./worker"], "engine": {"backend": "thread"}}, "engine.backend",
     "cannot run in the node's own process"),
])
def test_what_a_language_cannot_take_is_refused_naming_the_field(tmp_path, data, path, words):
    (tmp_path / "app.py").write_text("")
    (tmp_path / "plain").write_text("not executable")
    executable(tmp_path / "worker", "#!/bin/sh\n")
    with pytest.raises(ManifestError) as err:
        parse(tmp_path, **data)
    assert err.value.path == path and words in str(err.value), str(err.value)
    assert str(tmp_path / "manifest.json") in str(err.value)


def test_a_plugins_command_carries_the_launch_contract(tmp_path):
    launch = Launch(app="a", entry=tmp_path / "worker", args=("--x",), base_dir=tmp_path,
                    transport=SOCKET, link_fd=7, heartbeat=10.0, concurrency=2, parent_pid=99,
                    limits={"open_files": 64})
    cmd = languages.get("exec").command(launch)
    assert cmd.argv[-2:] == [str(tmp_path / "worker"), "--x"]
    assert cmd.env == {"ENGINE_APP": "a", "ENGINE_LINK": "fd:7", "ENGINE_HEARTBEAT": "10.000",
                       "ENGINE_CONCURRENCY": "2", "ENGINE_PROTOCOL": "1",
                       "ENGINE_PARENT_PID": "99"}
    if "prlimit" in cmd.argv:
        assert "--nofile=64" in cmd.argv


def test_nodejs_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))         # no node here
    assert "`node` on the PATH" in languages.get("nodejs").missing()


# -- through real nodes --------------------------------------------------------------------

ECHO = textwrap.dedent('''\
    import os
    from engine import on

    @on("echo")
    def echo(data):
        return data

    @on("pid")
    def pid(data):
        return os.getpid()
    ''')


@pytest.mark.e2e
async def test_an_exec_program_on_a_socket_serves_like_any_slave(tmp_path, monkeypatch):
    """An executable that speaks the protocol on the inherited socket (here a shell
    script that runs the Python worker from the launch contract's variables)."""
    folder = write_app(tmp_path, ECHO, {"transport": "socket", "pool-limit": 1}, name="viaexec")
    executable(folder / "worker", textwrap.dedent('''\
        #!/bin/sh
        echo "starting in $(pwd) for $ENGINE_APP" >&2
        exec "$TEST_PYTHON" -m engine.worker --app "$ENGINE_APP" --entry app.py \\
            --fd "${ENGINE_LINK#fd:}" --heartbeat "$ENGINE_HEARTBEAT" \\
            --concurrency "$ENGINE_CONCURRENCY" --parent-pid "$ENGINE_PARENT_PID"
        '''))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "type": "exec",
                                                      "args": ["./worker"]}))
    monkeypatch.setenv("TEST_PYTHON", sys.executable)
    node = await start_node_process([folder], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(30):
                assert await client.call("viaexec", "echo", [1, "two"]) == [1, "two"]
                info = await client.info("viaexec")
                assert info["pool"]["slaves"][0]["pid"] == await client.call("viaexec", "pid")
        log = (tmp_path / "node.log").read_text()
        assert f"starting in {folder} for viaexec" in log     # its stderr: the app's log
    finally:
        assert not stop_node(node)


@pytest.mark.e2e
async def test_a_plugin_from_the_entry_point_group_runs_its_apps(tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "engine_pyagain-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: engine-pyagain\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[engine.languages]\npyagain = engine_pyagain:PyAgain\n")
    (site / "engine_pyagain.py").write_text(textwrap.dedent('''\
        from engine.languages.python import PythonPlugin

        class PyAgain(PythonPlugin):
            """Python under another name: enough to see the group read."""
            name = "pyagain"
        '''))
    folder = write_app(tmp_path / "apps", ECHO, name="again")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "type": "pyagain"}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(site), os.environ.get("PYTHONPATH")])))
    node = await start_node_process([folder], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(30):
                assert await client.call("again", "echo", "plugged") == "plugged"
    finally:
        assert not stop_node(node)


@pytest.mark.e2e
async def test_a_language_whose_runtime_is_missing_is_refused_and_others_run_on(
        tmp_path, monkeypatch):
    py = write_app(tmp_path / "apps", ECHO, name="pyapp")
    js = tmp_path / "apps" / "jsapp"
    js.mkdir()
    (js / "app.js").write_text('require("engine-worker").on("echo", (d) => d);\n')
    (js / "manifest.json").write_text(json.dumps({"type": "nodejs"}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no node on this node's PATH
    node = await start_node_process([py, js], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(30):
                listing = await client.list()
                assert set(listing["apps"]) == {"pyapp"}
                reason = listing["rejected"][str(js / "manifest.json")]
                assert "nodejs plugin needs `node` on the PATH" in reason
                with pytest.raises(HandlerError) as err:    # local errors: by type name
                    await client.deploy(js / "manifest.json")
                assert err.value.type == LanguageUnavailable.__name__
                assert "the nodejs plugin needs `node` on the PATH" in err.value.message
                assert await client.call("pyapp", "echo", "on") == "on"
    finally:
        assert not stop_node(node)
