"""A slave's output and logging reach the node's log as they happen (#17, "Logs"):
prefixed with app and slave, at their level, rate-limited per slave, configurable per
app (``engine.log-output``); ``run --log-format json`` writes one JSON object a line."""
from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path

import pytest
import trio

from engine.client import connect
from engine.errors import ManifestError
from engine.manifest import parse_manifest
from engine.pool.output_log import OutputGate
from engine.protocol.output_lines import parse_line, record_line

from support import start_node_process, stop_node, wait_until

APP = textwrap.dedent('''\
    import logging
    from engine import on

    log = logging.getLogger("chatty.handlers")


    @on("talk")
    def talk(data):
        print("printed", data)
        log.info("info record %s", data)
        log.warning("warning record\\nsecond line")
        return "ok"


    @on("flood")
    def flood(n):
        for i in range(n):
            print("line", i)
        return n
    ''')


def chatty_app(where: Path, **engine) -> Path:
    folder = where / "chatty"
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(APP)
    (folder / "manifest.json").write_text(json.dumps(
        {"type": "python", "args": "app.py", "engine": {"pool-limit": 1, **engine}, "drivers": {}}))
    return folder


# -- pure ---------------------------------------------------------------------------------------

def test_a_record_line_reads_back_at_its_level_and_a_plain_line_at_info():
    line = record_line("WARNING", "chatty.handlers", "careful\nsecond line")
    first, second = line.split("\n")
    assert parse_line(first) == (logging.WARNING, "chatty.handlers: careful")
    assert parse_line(second) == (logging.INFO, "  second line")
    assert parse_line("printed hi") == (logging.INFO, "printed hi")
    assert parse_line("\x1elog NOTALEVEL x") == (logging.INFO, "\x1elog NOTALEVEL x")


def test_the_gate_lets_a_burst_through_then_the_rate_and_says_what_it_dropped():
    gate = OutputGate(rate=10)
    assert [gate.admit(0.0) for _ in range(20)] == [(True, 0)] * 20      # the burst: 2 x rate
    assert gate.admit(0.0) == (False, -1)                               # "dropping"
    assert gate.admit(0.01) == (False, 0)
    assert gate.admit(0.2) == (True, 2)                                 # refilled: 2 dropped
    assert gate.admit(0.2) == (True, 0)
    assert gate.admit(0.2) == (False, -1) and gate.close() == 1
    silent = OutputGate(rate=0)
    assert silent.admit(0.0) == (False, 0) and silent.close() == 0


@pytest.mark.parametrize("value, rate", [(True, 50.0), (False, 0.0), (5, 5.0), (0.5, 0.5)])
def test_log_output_is_true_false_or_lines_per_second(tmp_path, value, rate):
    (tmp_path / "app.py").write_text("")
    manifest = parse_manifest({"type": "python", "args": "app.py", "engine": {"log-output": value}},
                              source=tmp_path / "manifest.json")
    assert manifest.engine.log_output == rate


@pytest.mark.parametrize("value", [0, -1, "yes", None, float("inf")])
def test_a_bad_log_output_is_refused_naming_the_field(tmp_path, value):
    (tmp_path / "app.py").write_text("")
    with pytest.raises(ManifestError, match="engine.log-output: expected true, false or a positive"):
        parse_manifest({"type": "python", "args": "app.py", "engine": {"log-output": value}},
                       source=tmp_path / "manifest.json")


# -- a real node --------------------------------------------------------------------------------

@pytest.mark.e2e
async def test_a_slaves_prints_and_records_reach_the_node_log_at_their_level(tmp_path):
    node = await start_node_process([chatty_app(tmp_path / "apps")], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=20) as client:
            assert await client.call("chatty", "talk", "hi") == "ok"
            log = tmp_path / "node.log"
            await wait_until(lambda: "second line" in log.read_text(), "the records are logged",
                             timeout=10, interval=0.05)
            text = log.read_text()
            assert re.search(r"engine\.app\.chatty INFO chatty\[\d+\] printed hi$", text, re.M), text
            assert re.search(r"engine\.app\.chatty INFO chatty\[\d+\] chatty\.handlers: info record hi$",
                             text, re.M), text
            assert re.search(r"engine\.app\.chatty WARNING chatty\[\d+\] chatty\.handlers: warning record$",
                             text, re.M), text

            # 1,000 lines at once: about the burst (100) is logged, then a warning.
            assert await client.call("chatty", "flood", 1000) == 1000
            await wait_until(lambda: "dropping lines" in log.read_text(), "the gate says so",
                             timeout=10, interval=0.05)
            logged = len(re.findall(r"chatty\[\d+\] line \d+$", log.read_text(), re.M))
            assert 90 <= logged < 200, logged          # (the talk took a few tokens)
    finally:
        assert not stop_node(node)


@pytest.mark.e2e
async def test_log_output_false_keeps_the_node_log_quiet_and_json_lines_parse(tmp_path):
    node = await start_node_process([chatty_app(tmp_path / "apps", **{"log-output": False})],
                                    tmp_path / "node.log", tmp_path, "--log-format", "json")
    try:
        async with connect(node.address, timeout=20) as client:
            assert await client.call("chatty", "talk", "quiet") == "ok"
            await client.verb("info")           # (a round trip after the job: its output is in)
    finally:
        assert not stop_node(node)
    lines = (tmp_path / "node.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]       # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"] == "engine.node" and "serving 1 app" in e["message"] for e in entries)
    assert not any(e["logger"].startswith("engine.app.") for e in entries), entries


@pytest.mark.e2e
async def test_an_app_that_configures_logging_itself_keeps_its_configuration(tmp_path):
    """The worker's handler is logging's last resort, not a root handler: an app's own
    ``basicConfig`` (here DEBUG, its own format) still takes effect."""
    folder = chatty_app(tmp_path / "apps")
    (folder / "app.py").write_text(textwrap.dedent('''\
        import logging
        from engine import on

        logging.basicConfig(level=logging.DEBUG, format="OWN %(levelname)s %(message)s")


        @on("talk")
        def talk(data):
            logging.getLogger("chatty").debug("debug %s", data)
            return "ok"
        '''))
    node = await start_node_process([folder], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=20) as client:
            assert await client.call("chatty", "talk", "mine") == "ok"
            log = tmp_path / "node.log"
            await wait_until(lambda: "OWN DEBUG debug mine" in log.read_text(),
                             "the app's own format, at its own level", timeout=10, interval=0.05)
    finally:
        assert not stop_node(node)
