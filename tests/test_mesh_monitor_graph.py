"""The monitor shows who talks to whom (issue #15): a beacon's links (its wire format,
checked as anything parsed from the network), the counts a Requester and a Subscriber
keep and announce, ``Monitor.graph()``, the CLI's connections, and ``--web``'s page in
headless Chromium."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from support import wait_until
from browser_support import chromium, chromium_or_skip
from transport import Monitor, Publisher, Requester, Responder, Subscriber
from transport.__main__ import parse, render
from transport.mesh.discovery import Discovery, DiscoveryConfig
from transport.mesh.link_counts import tell_links
from transport.mesh.monitor_web import CSP, GraphServer
from transport.mesh.peers import (
    MAX_COUNT, MAX_DATAGRAM, MAX_LINK_ID, MAX_LINKS, BadDatagram, Beacon, PeerTable,
    decode_datagram, encode_datagram, links_of,
)

ROOT = Path(__file__).resolve().parent.parent


def hexid(i: int) -> str:
    return f"{i:032x}"


# -- the beacon's links ---------------------------------------------------------------

def test_links_round_trip_and_are_omitted_when_empty():
    plain = Beacon(id="r1", name="rq", role="requester", types=("a",))
    assert "l" not in plain.to_wire()
    assert Beacon.from_wire(plain.to_wire()) == plain
    linked = Beacon(id="r1", name="rq", role="requester", links=((hexid(1), 3), (hexid(2), 0)))
    wire = linked.to_wire()
    assert wire["l"] == [[hexid(1), 3], [hexid(2), 0]]
    assert Beacon.from_wire(wire) == linked
    # through a datagram (msgpack makes lists of the tuples): still equal
    assert decode_datagram(encode_datagram("hello", linked)).beacon == linked
    # an older beacon, without the key, decodes with no links
    older = {k: v for k, v in wire.items() if k != "l"}
    assert Beacon.from_wire(older).links == ()


@pytest.mark.parametrize("links", [
    "x", {"a": 1}, 7, None,                               # not a list
    ["a"], [["a"]], [["a", 1, 2]], [("a", 1)],            # not [id, count] pairs
    [[1, 1]], [["", 1]], [["x" * (MAX_LINK_ID + 1), 1]],  # ids: non-empty strings, bounded
    [["a", -1]], [["a", 1.5]], [["a", True]], [["a", "1"]], [["a", None]],
    [["a", MAX_COUNT + 1]],                               # counts: non-negative ints
    [[hexid(i), 1] for i in range(MAX_LINKS + 1)],        # at most MAX_LINKS pairs
])
def test_bad_links_are_a_bad_datagram(links):
    wire = Beacon(id="r1", name="rq", role="requester").to_wire()
    wire["l"] = links
    with pytest.raises(BadDatagram):
        Beacon.from_wire(wire)


def test_bad_links_in_a_datagram_from_the_network():
    good = encode_datagram("hello", Beacon(id="r1", name="rq", role="requester",
                                           links=(("p", 1),)))
    bad = good.replace(b"\xa1p\x01", b"\xa1p\xff")     # the count becomes -1
    assert bad != good
    with pytest.raises(BadDatagram):
        decode_datagram(bad)


def test_constructing_a_beacon_checks_links_too():
    with pytest.raises(ValueError):
        Beacon(id="r1", name="rq", role="requester", links=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Beacon(id="r1", name="rq", role="requester", links=(("a", -1),))


def test_a_beacon_with_every_link_stays_a_datagram_when_sealed():
    # The most a beacon's links can take: MAX_LINKS ids of the longest kind, the largest
    # counts; beside a few types, a long endpoint and host, signed with seq and time.
    full = Beacon(id=hexid(0), name="a-requester-with-a-longish-name", role="requester",
                  namespace="namespace", key="key", environment="production",
                  types=tuple(f"service.method{i}" for i in range(20)),
                  endpoint="tcp://[fe80::1234:5678:9abc:def0]:65535", host="h" * 63,
                  pid=2**31, links=tuple((f"{i:0{MAX_LINK_ID}x}", MAX_COUNT)
                                         for i in range(MAX_LINKS)))
    data = encode_datagram("hello", full, ask=True, secret=b"s" * 32, seq=2**62, at=2e9)
    assert len(data) < MAX_DATAGRAM, len(data)
    # 32-hex ids, as components have: far below
    usual = Beacon(id=hexid(0), name="rq", role="requester",
                   links=tuple((hexid(i), 10**9) for i in range(MAX_LINKS)))
    sealed = encode_datagram("hello", usual, secret=b"s", seq=1, at=1.0)
    assert len(sealed) < MAX_DATAGRAM // 2, len(sealed)
    assert decode_datagram(data, secret=b"s" * 32).beacon == full


def test_links_of_keeps_the_busiest_sorted_and_leaves_out_long_ids():
    counts = [(hexid(i), i) for i in range(100)] + [("x" * (MAX_LINK_ID + 1), 10**6)]
    links = links_of(counts)
    assert len(links) == MAX_LINKS
    assert [peer for peer, _ in links] == sorted(peer for peer, _ in links)
    assert {count for _, count in links} == set(range(100 - MAX_LINKS, 100))
    assert links_of([]) == ()
    assert links_of([("b", 2), ("a", 1)]) == (("a", 1), ("b", 2))
    Beacon(id="r", name="r", role="requester", links=links)   # always a valid beacon


def test_new_counts_alone_are_kept_but_change_nothing_a_component_plans_by():
    table = PeerTable()
    rq = Beacon(id="r1", name="rq", role="requester", types=("a",))
    assert table.observe(rq, 0) == "added"
    counted = Beacon(id="r1", name="rq", role="requester", types=("a",), links=(("p", 5),))
    assert table.observe(counted, 1) is None          # no reconciling for a count
    assert table.peers() == [counted]                 # but the monitor reads it
    retyped = Beacon(id="r1", name="rq", role="requester", types=("b",), links=(("p", 6),))
    assert table.observe(retyped, 2) == "changed"


def test_the_beacon_is_told_its_links_until_it_is_gone():
    me = Beacon(id="r1", name="rq", role="requester")
    discovery = SimpleNamespace(me=me)
    counts = {"p2": 4, "p1": 1}
    assert tell_links(discovery, counts.items)  # type: ignore[arg-type]
    assert discovery.me.links == (("p1", 1), ("p2", 4))
    assert discovery.me.id == "r1"
    assert not tell_links(discovery, counts.items)  # type: ignore[arg-type]  # unchanged
    discovery.me = None                            # drained: nothing to tell
    assert not tell_links(discovery, counts.items)  # type: ignore[arg-type]
    assert not tell_links(None, counts.items)


# -- the monitor's view, from a table fed by hand ---------------------------------------

def fed_monitor(*beacons: Beacon) -> Monitor:
    mon = Monitor(discovery=DiscoveryConfig(port=1, interface="127.0.0.1"))
    mon.discovery = Discovery(mon.beacon(), mon.discovery_config, monitor=True)
    for b in beacons:
        mon.discovery.table.observe(b, trio.current_time())
    return mon


async def test_graph_and_rows_from_beacons():
    rep = Beacon(id="rep1", name="rep", role="responder")
    pub = Beacon(id="pub1", name="pub", role="publisher")
    sub2 = Beacon(id="sub2", name="other-sub", role="subscriber")
    rq = Beacon(id="rq1", name="rq", role="requester",
                links=(("gone", 2), ("pub1", 3), ("rep1", 7)))   # gone: unseen; pub1: no responder
    sub = Beacon(id="sub1", name="sub", role="subscriber", links=(("pub1", 11), ("sub2", 1)))
    liar = Beacon(id="rep2", name="liar", role="responder", links=(("rq1", 5),))
    mon = fed_monitor(rep, pub, rq, sub, sub2, liar,
                      Beacon(id="m2", name="another-monitor", role="monitor"))
    graph = mon.graph()
    assert {n["id"] for n in graph["nodes"]} == {"rep1", "pub1", "rq1", "sub1", "sub2", "rep2"}
    node = next(n for n in graph["nodes"] if n["id"] == "rq1")
    assert set(node) == {"id", "name", "role", "namespace", "environment", "host", "pid", "types"}
    assert graph["edges"] == [
        {"from": "rq1", "to": "rep1", "count": 7, "kind": "request"},
        {"from": "sub1", "to": "pub1", "count": 11, "kind": "event"},
    ]
    rows = {r["id"]: r for r in mon.rows()}
    assert rows["rq1"]["links"] == [{"to": "gone", "to_name": None, "count": 2},
                                    {"to": "pub1", "to_name": "pub", "count": 3},
                                    {"to": "rep1", "to_name": "rep", "count": 7}]
    assert rows["rep1"]["links"] == []
    text = render(mon.rows())
    assert re.search(r"requester rq -> responder rep +7 requests", text), text
    assert re.search(r"subscriber sub -> publisher pub +11 events", text), text
    assert re.search(r"requester rq -> \(not seen\) gone +2 requests", text), text
    assert "liar ->" not in text     # a responder's links are no connections
    assert render([]).endswith("0 component(s)\nconnections: none")


async def test_the_web_port_answers_the_page_and_the_graph():
    rq = Beacon(id="rq1", name="rq", role="requester", links=(("rep1", 4),))
    mon = fed_monitor(rq, Beacon(id="rep1", name="rep", role="responder"))
    server = GraphServer(mon.graph)
    status, body, ctype = server.answer("GET", "/api/graph?x=1", "127.0.0.1:9")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == mon.graph()
    status, page, ctype = server.answer("GET", "/", "localhost:8080")
    assert status == 200 and ctype.startswith("text/html")
    assert b"/api/graph" in page
    assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b""), "no CDN"
    assert server.answer("POST", "/", "127.0.0.1")[0] == 405
    assert server.answer("GET", "/", "evil.example:80")[0] == 403   # DNS rebinding guard
    assert GraphServer(mon.graph, guard_host=False).answer("GET", "/", "evil.example")[0] == 200
    assert server.answer("GET", "/nope", "127.0.0.1")[0] == 404
    assert "script-src 'unsafe-inline'" in CSP and "connect-src 'self'" in CSP


def test_web_is_not_for_once():
    assert parse(["monitor", "--web", "0"]).web == 0
    assert parse(["monitor"]).web_host == "127.0.0.1"
    for bad in (["--web", "0", "--once"], ["--web", "0", "--json"], ["--web", "70000"]):
        with pytest.raises(SystemExit):
            parse(["monitor", *bad])


# -- end to end -----------------------------------------------------------------------

def named_responder(name: str, disco: DiscoveryConfig) -> Responder:
    rep = Responder(name, responds_to=["work"], discovery=disco)

    @rep.on("work")
    async def work(req):
        return {"by": name}
    return rep


def edge(graph: dict, a: str, b: str) -> dict | None:
    return next((e for e in graph["edges"] if e["from"] == a and e["to"] == b), None)


@pytest.mark.e2e
async def test_the_graph_shows_who_talks_to_whom_with_counts(disco):
    rep_a, rep_b = named_responder("rep-a", disco), named_responder("rep-b", disco)
    pub = Publisher("pub", broadcasts=["tick"], discovery=disco)
    sub = Subscriber("sub", subscribes_to=["tick"], discovery=disco)
    with trio.fail_after(40):
        async with Monitor(discovery=disco) as mon, rep_a, pub, sub, \
                Requester("rq", requests=["work"], discovery=disco) as rq:
            async with rep_b:
                for _ in range(3):
                    assert await rq.send({"type": "work"}, to=rep_a.id) == {"by": "rep-a"}
                for _ in range(5):
                    assert await rq.send({"type": "work"}, to=rep_b.id) == {"by": "rep-b"}
                await wait_until(lambda: pub.subscribers >= 1, "the subscriber is connected")
                for i in range(12):
                    pub.publish("tick", i)
                got = [(await sub.receive()).data for _ in range(12)]
                assert got == list(range(12))

                def counts() -> tuple:
                    g = mon.graph()
                    ea, eb, ev = edge(g, rq.id, rep_a.id), edge(g, rq.id, rep_b.id), \
                        edge(g, sub.id, pub.id)
                    return ea and eb and ev and (ea["count"], eb["count"], ev["count"])
                assert await wait_until(counts, "the monitor sees the counts") == (3, 5, 12)
                graph = mon.graph()
                assert {n["name"]: n["role"] for n in graph["nodes"]} == {
                    "rep-a": "responder", "rep-b": "responder", "pub": "publisher",
                    "sub": "subscriber", "rq": "requester"}
                assert {(e["from"], e["to"], e["kind"]) for e in graph["edges"]} == {
                    (rq.id, rep_a.id, "request"), (rq.id, rep_b.id, "request"),
                    (sub.id, pub.id, "event")}
                row = next(r for r in mon.rows() if r["id"] == rq.id)
                assert {(link["to_name"], link["count"]) for link in row["links"]} == {
                    ("rep-a", 3), ("rep-b", 5)}

                # many in flight from one task: counted where each burst is sent
                async with contextlib.aclosing(rq.send_many(
                        ({"type": "work"} for _ in range(40)), window=10)) as answers:
                    assert len([a async for a in answers]) == 40

                def total() -> int:
                    g = mon.graph()
                    return sum(e["count"] for e in g["edges"] if e["from"] == rq.id)
                await wait_until(lambda: total() == 48, "the monitor sees 48 requests")
            # rep-b has left: its node and its edge go
            await wait_until(lambda: all(n["id"] != rep_b.id for n in mon.graph()["nodes"]),
                             "the monitor drops rep-b")
            assert edge(mon.graph(), rq.id, rep_b.id) is None
            assert edge(mon.graph(), rq.id, rep_a.id) is not None


@pytest.mark.e2e
async def test_cli_monitor_prints_the_connections(disco):
    rep = named_responder("rep-cli", disco)
    with trio.fail_after(40):
        async with rep, Requester("rq-cli", requests=["work"], discovery=disco) as rq:
            for _ in range(7):
                await rq.send({"type": "work"})
            await wait_until(lambda: rq.discovery.me.links == ((rep.id, 7),),
                             "the requester's beacon carries its link")
            base = [sys.executable, "-m", "transport", "monitor", "--wait", "2",
                    "--port", str(disco.port), "--interface", "127.0.0.1"]
            as_json = await trio.run_process(base + ["--json"], capture_stdout=True,
                                             capture_stderr=True)
            as_text = await trio.run_process(base + ["--once"], capture_stdout=True,
                                             capture_stderr=True)
    rows = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert rows["rq-cli"]["links"] == [{"to": rep.id, "to_name": "rep-cli", "count": 7}]
    assert rows["rep-cli"]["links"] == []
    text = as_text.stdout.decode()
    assert re.search(r"^connections:\n  requester rq-cli -> responder rep-cli  7 requests$",
                     text, re.M), text


# -- the page, in headless Chromium ---------------------------------------------------------

URL_RE = re.compile(r"mesh monitor graph on (http://127\.0\.0\.1:\d+/)")


@contextlib.asynccontextmanager
async def web_monitor(disco: DiscoveryConfig, tmp_path: Path):
    """``python -m transport monitor --web 0`` on the test's discovery port: yields the
    page's URL; the process is ended in any case."""
    err_path = tmp_path / "monitor.err"
    with open(err_path, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "transport", "monitor", "--web", "0",
             "--port", str(disco.port), "--interface", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            match = await wait_until(lambda: URL_RE.search(err_path.read_text()),
                                     "the monitor says where its page is", timeout=15,
                                     interval=0.05)
            yield match.group(1)
        finally:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def get_json(url: str) -> dict:
    """GET ``url`` (http://127.0.0.1:PORT/path) and parse its JSON body."""
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def traffic(rq: Requester, pub: Publisher) -> None:
    while True:
        with contextlib.suppress(Exception):
            await rq.send({"type": "work"}, timeout=2)
        pub.publish("tick", None)
        await trio.sleep(0.01)


def dom_nodes(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<g class="node" data-id="[0-9a-f]+" data-name="([^"]+)" '
                           r'data-role="(\w+)"', dom))


@pytest.mark.e2e
async def test_the_web_page_draws_the_graph_and_follows_components(disco, tmp_path):
    binary = chromium_or_skip("monitor page's")
    rep_a, rep_b = named_responder("rep-a", disco), named_responder("rep-b", disco)
    with trio.fail_after(150):
        async with web_monitor(disco, tmp_path) as url, rep_a, \
                Publisher("pub", broadcasts=["tick"], discovery=disco) as pub, \
                Subscriber("sub", subscribes_to=["tick"], discovery=disco) as sub, \
                Requester("rq", requests=["work"], discovery=disco) as rq, \
                trio.open_nursery() as nursery:
            async with rep_b:
                nursery.start_soon(traffic, rq, pub)

                async def busy() -> bool:   # the monitor sees every link carry something
                    g = await get_json(url + "api/graph")
                    return len(g["nodes"]) == 5 and len(g["edges"]) == 3 and \
                        all(e["count"] > 0 for e in g["edges"])
                await wait_until(busy, "the monitor sees three busy links", timeout=20,
                                 interval=0.2)
                # The page polls every second of *virtual* time: a budget of 4 s runs its
                # script through a few polls (real requests to the monitor), then the DOM.
                dom = (await chromium(binary, tmp_path, "dom", "--virtual-time-budget=4000",
                                      "--dump-dom", url)).decode()
                shot = tmp_path / "monitor.png"
                await chromium(binary, tmp_path, "shot", "--window-size=1280,760",
                               "--virtual-time-budget=4000", f"--screenshot={shot}", url)
            # rep-b has left (said bye): once the monitor's API agrees, a later load too
            async def gone() -> bool:
                g = await get_json(url + "api/graph")
                return all(n["id"] != rep_b.id for n in g["nodes"])
            await wait_until(gone, "the monitor drops rep-b", timeout=10, interval=0.1)
            later = (await chromium(binary, tmp_path, "later", "--virtual-time-budget=3000",
                                    "--dump-dom", url)).decode()
            nursery.cancel_scope.cancel()
    (tmp_path / "monitor.html").write_text(dom)      # kept with the test's files, to look at

    assert int(re.search(r'<body data-polls="(\d+)"', dom).group(1)) >= 2
    assert dom_nodes(dom) == {"rep-a": "responder", "rep-b": "responder", "pub": "publisher",
                              "sub": "subscriber", "rq": "requester"}
    edges = re.findall(r'<g class="edge" data-from="([0-9a-f]+)" data-to="([0-9a-f]+)" '
                       r'data-count="(\d+)" data-kind="(\w+)"><path d="M', dom)
    assert {(a, b, kind) for a, b, _, kind in edges} == {
        (rq.id, rep_a.id, "request"), (rq.id, rep_b.id, "request"), (sub.id, pub.id, "event")}
    labels = dict(((a, b), (n, unit)) for a, b, n, unit in re.findall(
        r'<g class="label" data-from="([0-9a-f]+)" data-to="([0-9a-f]+)"><rect [^>]*></rect>'
        r'<text class="count"[^>]*>([\d,]+) (req|ev)</text>', dom))
    for a, b, count, kind in edges:
        assert int(count) > 0, "every link carried something"
        assert labels[a, b] == (f"{int(count):,}", "req" if kind == "request" else "ev"), \
            "each edge is labelled with its count"
    assert re.search(r'<span id="live-text">live · ', dom)
    assert re.search(r'<b id="n-edges">3</b>', dom)

    assert dom_nodes(later) == {"rep-a": "responder", "pub": "publisher", "sub": "subscriber",
                                "rq": "requester"}
    assert rep_b.id not in later
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, "a screenshot with a graph"
