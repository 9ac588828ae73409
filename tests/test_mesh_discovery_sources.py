"""Discovery where multicast does not pass (issue 15): DNS seeds and the Redis registry.

Unit tests for the pure parts (seed specs, address sets, outages, RESP, Redis URLs) and
for the shell's behaviour on a fake socket layer and a fake resolver under trio's
MockClock (what is beaconed to as a name's answers change, what is logged, the start-up
line).  End to end: two components that cannot multicast to each other (each beacons on
a port of its own) find each other through a DNS seed, and through a real
``redis-server`` each test starts on loopback, and a Requester gets its answer.
"""
from __future__ import annotations

import errno
import logging
import shutil
import socket
import subprocess
from contextlib import contextmanager
from typing import Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from support import free_tcp_port, free_udp_port, wait_until, wait_until_sync
from transport import DiscoveryConfig, Requester, Responder
from transport.mesh import dns_seeds as dns_module
from transport.mesh import discovery as discovery_module
from transport.mesh.discovery import Discovery
from transport.mesh.monitor import Monitor
from transport.mesh.peers import Beacon, decode_datagram, encode_datagram
from transport.mesh.redis_registry import (
    ENVIRONMENTS_KEY, RedisConnection, beacon_key, error_name, index_key, open_connection,
)
from transport.mesh.redis_wire import (
    RedisUrl, RespError, RespParser, RespProtocolError, encode_command, parse_redis_url,
    parse_reply,
)
from transport.mesh.seeds import Outage, SeedSet, diff_addresses, parse_seed

LOGGER = "transport.mesh.discovery"
DNS_LOGGER = "transport.mesh.dns_seeds"
REDIS_LOGGER = "transport.mesh.redis_registry"
PORT = 47999
LOOPBACKS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


# -- pure: seeds ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, parsed", [
    ("mesh.ns.svc.cluster.local", ("mesh.ns.svc.cluster.local", PORT)),
    ("mesh:4747", ("mesh", 4747)),
    (" 10.0.0.5:1 ", ("10.0.0.5", 1)),
    ("localhost", ("localhost", PORT)),
])
def test_parse_seed(spec, parsed):
    assert parse_seed(spec, PORT) == parsed


@pytest.mark.parametrize("spec", ["", ":80", "mesh:", "mesh:x", "mesh:0", "mesh:70000",
                                  "[::1]:80", "a b", "redis://x"])
def test_parse_seed_refuses(spec):
    with pytest.raises(ValueError, match="host or host:port"):
        parse_seed(spec, PORT)


def test_diff_addresses():
    a, b, c = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    assert diff_addresses([a, b], [b, c]) == ({c}, {a})
    assert diff_addresses([], [a]) == ({a}, set())
    assert diff_addresses([a], [a]) == (set(), set())


def test_seed_set_unions_names_and_says_each_outage_once():
    seeds = SeedSet.of([("one", 1), ("two", 1), ("one", 1)])
    one, two = seeds.seeds
    assert len(seeds.seeds) == 2                       # a name listed twice is one seed
    assert seeds.describe() == "dns seeds one resolving, two resolving"

    change = seeds.resolved(one, ["10.0.0.1", "10.0.0.2"])
    assert change.added == {("10.0.0.1", 1), ("10.0.0.2", 1)} and not change.removed
    change = seeds.resolved(two, ["10.0.0.2", "10.0.0.3"])
    assert change.added == {("10.0.0.3", 1)}           # 10.0.0.2 was there already
    change = seeds.resolved(one, ["10.0.0.1"])
    assert not change.removed                          # 10.0.0.2 still comes from "two"

    change = seeds.failed(two, "Name or service not known", keep=False)
    assert change.warn and change.removed == {("10.0.0.2", 1), ("10.0.0.3", 1)}
    assert not seeds.failed(two, "Name or service not known", keep=False).warn  # once
    assert seeds.problems() == ["dns seed two does not resolve: Name or service not known"]
    assert seeds.describe() == ("dns seeds one (1 address) ok, "
                                "two failed (Name or service not known)")

    change = seeds.resolved(two, ["10.0.0.3"])
    assert change.recovered and not change.warn and change.added == {("10.0.0.3", 1)}
    assert seeds.problems() == []

    change = seeds.failed(one, "timeout", keep=True)   # a DNS server not answering
    assert change.warn and not change.removed          # keeps what the name gave
    assert seeds.targets() == {("10.0.0.1", 1), ("10.0.0.3", 1)}
    assert seeds.problems() == [
        "dns seed one does not resolve: timeout (keeping its 1 last address(es))"]


def test_outage_warns_once_and_notes_recovery():
    outage = Outage()
    assert not outage and outage.ok() is None
    assert outage.failed("ConnectionRefusedError", now=10.0)
    assert not outage.failed("ConnectionRefusedError", now=11.0)
    assert not outage.failed("TooSlowError", now=12.0)
    assert outage and outage.error == "TooSlowError"
    assert outage.ok() == (10.0, 3)
    assert not outage and outage.ok() is None
    assert outage.failed("again", now=20.0)


# -- pure: config -----------------------------------------------------------------------

def test_config_reads_the_new_variables():
    cfg = DiscoveryConfig.from_env({"MESH_DNS_SEEDS": "mesh.a.svc, mesh.b:4000,,",
                                    "MESH_DNS_INTERVAL": "2.5",
                                    "MESH_REDIS": "redis://:pw@r:6380/2", "MESH_PORT": "5000"})
    assert cfg.dns_seeds == ("mesh.a.svc", "mesh.b:4000")
    assert cfg.dns_targets == (("mesh.a.svc", 5000), ("mesh.b", 4000))
    assert cfg.dns_interval == 2.5
    assert cfg.redis == "redis://:pw@r:6380/2"
    plain = DiscoveryConfig.from_env({})
    assert plain.dns_seeds == () and plain.redis is None and plain.dns_interval == 10.0
    assert DiscoveryConfig(dns_seeds="one.svc").dns_seeds == ("one.svc",)
    assert DiscoveryConfig(redis="").redis is None


@pytest.mark.parametrize("kw, message", [
    ({"dns_seeds": ("mesh:x",)}, "host or host:port"),
    ({"dns_interval": 0}, "dns_interval"),
    ({"redis": "http://r:6379"}, "redis://"),
    ({"redis": "rediss://r:6379"}, "TLS"),
    ({"redis": "redis://r:6379/zero"}, "database number"),
    ({"redis": "redis://:6379/0"}, "no host"),
])
def test_config_refuses_bad_sources(kw, message):
    with pytest.raises(ValueError, match=message):
        DiscoveryConfig(**kw)


# -- pure: RESP and Redis URLs ------------------------------------------------------------

def test_encode_command():
    assert encode_command("SET", b"k\r\n", 5) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n"


REPLIES = (b"+OK\r\n" b"-ERR wrong type\r\n" b":42\r\n" b"$5\r\nhe\r\nl\r\n" b"$-1\r\n"
           b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:7\r\n" b"*0\r\n" b"*-1\r\n" b"$0\r\n\r\n")


def _expected():
    return ["OK", ("error", "ERR wrong type"), 42, b"he\r\nl", None, [b"a", None, [7]], [],
            None, b""]


def _plain(reply):
    if isinstance(reply, RespError):
        return ("error", str(reply))
    if isinstance(reply, list):
        return [_plain(r) for r in reply]
    return reply


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(REPLIES)), max_size=8))
def test_resp_replies_split_anywhere_parse_the_same(cuts):
    parser = RespParser()
    got = []
    bounds = [0, *sorted(cuts), len(REPLIES)]
    for start, end in zip(bounds, bounds[1:]):
        parser.feed(REPLIES[start:end])
        while True:
            ok, reply = parser.next_reply()
            if not ok:
                break
            got.append(_plain(reply))
    assert got == _expected()
    assert parser.buffered == 0


@pytest.mark.parametrize("data", [b"?x\r\n", b":notanint\r\n", b"$3\r\nabcd\r\n",
                                  b"$99999999999\r\n", b"*-5\r\n", b"\r\n",
                                  b"*1\r\n" * 20 + b":1\r\n"])
def test_resp_garbage_is_a_protocol_error(data):
    with pytest.raises(RespProtocolError):
        parse_reply(data)


def test_resp_incomplete_is_none():
    assert parse_reply(b"$5\r\nhel") is None
    assert parse_reply(b"*2\r\n:1\r\n") is None
    assert parse_reply(b":1") is None


@pytest.mark.parametrize("url, parsed, shown", [
    ("redis://r", RedisUrl("r", 6379, 0), "redis://r:6379/0"),
    ("redis://10.0.0.7:6380/3", RedisUrl("10.0.0.7", 6380, 3), "redis://10.0.0.7:6380/3"),
    ("redis://:s%40cret@r:1/0", RedisUrl("r", 1, 0, None, "s@cret"), "redis://:***@r:1/0"),
    ("redis://mesh:pw@r/", RedisUrl("r", 6379, 0, "mesh", "pw"), "redis://mesh:***@r:6379/0"),
    ("redis://[::1]:7/1", RedisUrl("::1", 7, 1), "redis://[::1]:7/1"),
])
def test_redis_urls(url, parsed, shown):
    assert parse_redis_url(url) == parsed
    assert str(parsed) == shown          # what logs show: never the password


def test_error_names_for_the_start_up_line():
    refused = OSError("all attempts to connect to 127.0.0.1:1 failed")
    refused.__cause__ = ExceptionGroup("all attempts", [ConnectionRefusedError(111, "refused")])
    assert error_name(refused) == "ConnectionRefusedError"
    assert error_name(RespError("WRONGPASS invalid username-password pair")) == "WRONGPASS"
    assert error_name(trio.TooSlowError()) == "TooSlowError"


# -- the shell on a fake socket layer and a fake resolver ---------------------------------

class FakeSocket:
    """The part of a UDP socket discovery uses; never readable; records sends."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self._pair = socket.socketpair()  # a real descriptor for trio to wait on

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
        self.kernel.sent.append((address, decode_datagram(data).ask))
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        raise BlockingIOError

    def close(self) -> None:
        for s in self._pair:
            s.close()


class Kernel:
    def __init__(self) -> None:
        self.join_error: int | None = None
        self.sent: list[tuple[tuple[str, int], bool]] = []
        self.sockets: list[FakeSocket] = []

    def socket(self) -> FakeSocket:
        sock = FakeSocket(self)
        self.sockets.append(sock)
        return sock

    def destinations(self) -> set[tuple[str, int]]:
        return {addr for addr, _ in self.sent}


class Dns:
    """Answers for the resolver seam: a list of addresses, or an error to raise, or
    ``None`` for a DNS server that never answers."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | OSError | None] = {}
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answer = self.answers[host]
        if answer is None:
            await trio.sleep_forever()
        if isinstance(answer, OSError):
            raise answer
        assert isinstance(answer, list)
        return answer


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    k = Kernel()
    monkeypatch.setattr(discovery_module, "_udp_socket", k.socket)
    yield k
    for sock in k.sockets:
        sock.close()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Dns:
    d = Dns()
    monkeypatch.setattr(dns_module, "_resolve", d.resolve)
    return d


def me() -> Beacon:
    return Beacon(id="me-1", name="me", role="responder", endpoint="tcp://10.0.0.4:5000")


def no_such_name() -> OSError:
    return socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_dns_seed_addresses_follow_the_answers(kernel, dns, caplog, autojump_clock):
    caplog.set_level(logging.DEBUG)
    dns.answers["mesh.test"] = list(LOOPBACKS)
    cfg = DiscoveryConfig(port=PORT, interface="127.0.0.1", dns_seeds=("mesh.test",),
                          dns_interval=10.0, hello_interval=1.0, expiry=4.0)
    disco = Discovery(me(), cfg)
    targets = {(ip, PORT) for ip in LOOPBACKS}
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await wait_until(lambda: disco.startup_report, "the start-up line is logged")
            # Each new address is asked at once, then beaconed to every hello.
            assert {addr for addr, ask in kernel.sent if ask} >= targets
            kernel.sent.clear()
            await trio.sleep(1.5)
            assert kernel.destinations() == targets | {("239.255.74.74", PORT)}

            dns.answers["mesh.test"] = LOOPBACKS[:2]      # a pod went away
            await trio.sleep(10.0)
            kernel.sent.clear()
            await trio.sleep(1.5)
            assert ("127.0.0.3", PORT) not in kernel.destinations()
            assert ("127.0.0.1", PORT) in kernel.destinations()

            dns.answers["mesh.test"] = no_such_name()     # every pod gone: the name too
            for _ in range(3):
                await trio.sleep(10.0)
            kernel.sent.clear()
            await trio.sleep(1.5)
            assert kernel.destinations() == {("239.255.74.74", PORT)}
            assert disco.problems() == [
                "dns seed mesh.test does not resolve: Name or service not known "
                f"(gaierror {socket.EAI_NONAME})"]
            assert disco.dns is not None and disco.dns.stats["failed"] == 3

            dns.answers["mesh.test"] = ["127.0.0.9"]      # it resolves again
            await trio.sleep(10.0)
            assert disco.problems() == []
            assert ("127.0.0.9", PORT) in kernel.destinations()
            nursery.cancel_scope.cancel()

    [warning] = messages(caplog, DNS_LOGGER, logging.WARNING)   # once, not per try
    assert "mesh.test" in warning and "Name or service not known" in warning
    [note] = messages(caplog, DNS_LOGGER, logging.INFO)
    assert note == "discovery: dns seed mesh.test resolves again: 1 address(es)"
    [line] = [m for m in messages(caplog, LOGGER, logging.INFO) if "dns seeds" in m]
    assert line == ("discovery: multicast 239.255.74.74:47999 on 127.0.0.1 ok; broadcast off; "
                    "static peers off; dns seeds mesh.test (3 addresses) ok; redis off")


async def test_a_dns_server_that_does_not_answer_keeps_the_last_addresses(
        kernel, dns, caplog, autojump_clock):
    caplog.set_level(logging.INFO)
    dns.answers["slow.test"] = ["127.0.0.1"]
    cfg = DiscoveryConfig(port=PORT, interface="127.0.0.1", dns_seeds=("slow.test:5000",),
                          dns_interval=10.0)
    disco = Discovery(me(), cfg)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(1)
            dns.answers["slow.test"] = None
            await trio.sleep(16)                          # a resolution gives up after 5 s
            assert disco.dns is not None and disco.dns.targets() == {("127.0.0.1", 5000)}
            dns.answers["slow.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
            await trio.sleep(10)
            assert disco.dns.targets() == {("127.0.0.1", 5000)}
            kernel.sent.clear()
            await trio.sleep(1.5)
            assert ("127.0.0.1", 5000) in kernel.destinations()
            nursery.cancel_scope.cancel()
    [warning] = messages(caplog, DNS_LOGGER, logging.WARNING)
    assert "no answer within 5 s" in warning and "keep going to its 1 last" in warning


async def test_the_start_up_line_waits_for_a_silent_dns_only_so_long(kernel, dns, caplog,
                                                                   autojump_clock):
    caplog.set_level(logging.INFO)
    kernel.join_error = errno.ENODEV
    dns.answers["silent.test"] = None
    cfg = DiscoveryConfig(port=PORT, interface="10.0.0.4", dns_seeds=("silent.test",),
                          peers=("10.0.0.5", "10.0.0.6:4000"))
    disco = Discovery(me(), cfg)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            start = trio.current_time()
            await wait_until(lambda: disco.startup_report, "the start-up line is logged",
                             timeout=60)
            assert trio.current_time() - start == pytest.approx(discovery_module.REPORT_WAIT,
                                                                abs=0.1)
            nursery.cancel_scope.cancel()
    [line] = [m for m in messages(caplog, LOGGER, logging.INFO) if "dns seeds" in m]
    assert line == ("discovery: multicast 239.255.74.74:47999 on 10.0.0.4 failed (ENODEV); "
                    "broadcast 255.255.255.255:47999 (the fallback); static peers 2; "
                    "dns seeds silent.test resolving; redis off")
    # and the failed join said so on its own, as a warning
    [warning] = messages(caplog, LOGGER, logging.WARNING)
    assert "cannot be joined" in warning


def test_handle_datagram_from_a_registry_is_not_beaconed_to_nor_rewritten():
    disco = Discovery(me(), DiscoveryConfig(port=PORT))
    other = Beacon(id="o-1", name="o", role="requester", endpoint="tcp://0.0.0.0:7000")
    disco.handle_datagram(encode_datagram("hello", other, ask=True, seq=1, at=1.0),
                          ("redis:mesh:beacon:default:o-1", 0), 0.0, unicast=False)
    [peer] = disco.peers()
    assert peer.endpoint == "tcp://0.0.0.0:7000"       # not made "tcp://redis:...:7000"
    assert disco._learned == {} and disco.stats["answered"] == 0


def test_the_real_resolver_resolves_localhost():
    async def main() -> list[str]:
        return await dns_module._resolve("localhost", PORT)
    assert "127.0.0.1" in trio.run(main)


# -- end to end: DNS seeds ---------------------------------------------------------------

def isolated(**kw) -> DiscoveryConfig:
    """Loopback discovery on a port of its own: multicast works but reaches nobody else."""
    return DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1", hello_interval=0.5,
                           expiry=2.0, **kw)


def echo(disco: DiscoveryConfig, **kw) -> Responder:
    rep = Responder("rep", responds_to=["echo"], discovery=disco, **kw)

    @rep.on("echo")
    async def handle(req):
        return {"echo": req["val"]}
    return rep


@pytest.mark.e2e
async def test_found_through_a_name_with_several_addresses(dns):
    rep_cfg = isolated()
    dns.answers["mesh.test"] = list(LOOPBACKS)    # a headless service with three pods' IPs
    rq_cfg = isolated(dns_seeds=(f"mesh.test:{rep_cfg.port}",), dns_interval=0.5)
    async with echo(rep_cfg) as rep, Requester("req", discovery=rq_cfg) as rq:
        with trio.fail_after(10):
            assert await rq.send({"type": "echo", "val": 1}) == {"echo": 1}
        assert rq.discovery.dns.targets() == {(ip, rep_cfg.port) for ip in LOOPBACKS}
        assert [p.id for p in rq.peers()] == [rep.id]
        # the responder learned the requester's address from its hellos
        await wait_until(lambda: [p.id for p in rep.peers()] == [rq.id], "the responder sees it")


@pytest.mark.e2e
async def test_found_through_a_real_resolution_of_localhost():
    rep_cfg = isolated()
    rq_cfg = isolated(dns_seeds=(f"localhost:{rep_cfg.port}",))
    async with echo(rep_cfg), Requester("req", discovery=rq_cfg) as rq:
        with trio.fail_after(10):
            assert await rq.send({"type": "echo", "val": 2}) == {"echo": 2}
        assert ("127.0.0.1", rep_cfg.port) in rq.discovery.dns.targets()


# -- end to end: a real redis-server ---------------------------------------------------------

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed "
                                 "(.ci/run installs it: apt-get install redis-server)")


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def redis_server(port: int) -> Iterator[str]:
    """A redis-server on 127.0.0.1:port, no persistence, stopped on the way out."""
    assert REDIS is not None
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_sync(lambda: proc.poll() is not None or _accepts(port),
                        f"redis-server accepts connections on {port}", timeout=15)
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server(free_tcp_port()) as url:
        yield url


async def redis_call(url: str, *args: bytes | str | int):
    conn: RedisConnection = await open_connection(parse_redis_url(url))
    try:
        return await conn.call(*args)
    finally:
        await conn.aclose()


@pytest.mark.e2e
@needs_redis
@pytest.mark.parametrize("secret", [None, "s3cret"])
async def test_found_through_redis(redis_url, secret, caplog):
    caplog.set_level(logging.INFO)
    rep_cfg, rq_cfg = isolated(redis=redis_url), isolated(redis=redis_url)
    async with echo(rep_cfg, secret=secret, bind="0.0.0.0") as rep, \
            Requester("req", discovery=rq_cfg, secret=secret) as rq:
        with trio.fail_after(10):
            assert await rq.send({"type": "echo", "val": 3}) == {"echo": 3}
        # the entry is the datagram itself (signed with a secret), its endpoint dialable
        entry = await redis_call(redis_url, "GET", beacon_key("", rep.id))
        dgram = decode_datagram(entry, secret=secret.encode() if secret else None)
        assert dgram.op == "hello" and dgram.verified == bool(secret)
        assert dgram.beacon.endpoint.startswith("tcp://127.0.0.1:")
        ttl = await redis_call(redis_url, "PTTL", beacon_key("", rep.id))
        assert 0 < ttl <= 2000
        members = await redis_call(redis_url, "SMEMBERS", index_key(""))
        assert sorted(members) == sorted([rep.id.encode(), rq.id.encode()])
        assert await redis_call(redis_url, "SMEMBERS", ENVIRONMENTS_KEY) == [b"default"]
        assert rq.discovery.redis.stats["errors"] == 0
        assert rq.discovery.problems() == []
        # gone with a bye: dropped long before it would expire
        rq.discovery.table.expiry = 60.0
        rep.close()
        await wait_until(lambda: not rq.peers(), "the requester drops the responder", timeout=5)
        entry = await redis_call(redis_url, "GET", beacon_key("", rep.id))
        assert decode_datagram(entry, secret=secret.encode() if secret else None).op == "bye"
    lines = [m for m in messages(caplog, LOGGER, logging.INFO) if "redis redis://" in m]
    assert len(lines) == 2 and all(f"redis {redis_url} ok" in m for m in lines)


@pytest.mark.e2e
@needs_redis
async def test_a_wrong_secret_finds_nothing_through_redis(redis_url):
    async with echo(isolated(redis=redis_url), secret="s3cret"), \
            Requester("req", discovery=isolated(redis=redis_url), secret="other") as rq:
        await wait_until(lambda: rq.discovery.stats["bad"] > 0, "the entry is refused")
        assert rq.peers() == []


@pytest.mark.e2e
@needs_redis
async def test_expired_entries_leave_the_index_and_a_monitor_sees_every_environment(
        redis_url):
    await redis_call(redis_url, "SADD", index_key(""), "ghost")   # an entry long expired
    async with echo(isolated(redis=redis_url), environment="staging") as rep, \
            Requester("req", discovery=isolated(redis=redis_url)) as rq, \
            Monitor(discovery=isolated(redis=redis_url)) as mon:
        await wait_until(lambda: rq.discovery.redis.stats["stale"] >= 1
                         or mon.discovery.redis.stats["stale"] >= 1, "the ghost is removed")
        assert b"ghost" not in await redis_call(redis_url, "SMEMBERS", index_key(""))
        await wait_until(lambda: {r["id"] for r in mon.rows()} == {rep.id, rq.id},
                         "the monitor sees both environments")
        # another environment: not for the requester (which sees the monitor)
        assert rep.id not in {p.id for p in rq.peers()}
        assert sorted(await redis_call(redis_url, "SMEMBERS", ENVIRONMENTS_KEY)) == [
            b"default", b"staging"]


@pytest.mark.e2e
@needs_redis
async def test_redis_unreachable_is_said_once_and_its_recovery_too(caplog):
    caplog.set_level(logging.INFO)
    port = free_tcp_port()
    url = f"redis://127.0.0.1:{port}/0"
    rep_cfg, rq_cfg = isolated(redis=url), isolated(redis=url)
    async with echo(rep_cfg) as rep, Requester("req", discovery=rq_cfg) as rq:
        await wait_until(lambda: rq.discovery.startup_report, "the start-up line is logged")
        assert rq.discovery.startup_report.endswith(
            f"redis {url} unreachable (ConnectionRefusedError)")
        await wait_until(lambda: rq.discovery.redis.stats["errors"] >= 3, "three attempts")
        [problem] = rq.discovery.problems()
        assert problem.startswith(f"redis {url} unreachable since ")
        assert "ConnectionRefusedError" in problem
        warnings = [m for m in messages(caplog, REDIS_LOGGER, logging.WARNING)
                    if m.startswith(f"discovery: redis {url} unreachable")]
        assert len(warnings) == 2          # one per component, not one per attempt
        assert rq.peers() == []
        with redis_server(port):
            with trio.fail_after(30):      # (the backoff is at 2-4 s by now)
                assert await rq.send({"type": "echo", "val": 4}) == {"echo": 4}
            await wait_until(lambda: rq.discovery.problems() == [], "no problem left")
            notes = [m for m in messages(caplog, REDIS_LOGGER, logging.INFO)
                     if "reachable again" in m]
            assert any(url in m for m in notes)
            assert [p.id for p in rq.peers()] == [rep.id]
