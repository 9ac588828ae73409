"""The Redis registry: beacons kept in Redis, for networks where multicast does not pass.

Each component writes its beacon, the very datagram it multicasts (signed with the
mesh's secret, numbered and timed, so authentication and replay refusal still apply),
under ``mesh:beacon:<environment>:<id>`` with a TTL of ``expiry`` seconds, and rewrites
it every ``hello_interval``; it adds its id to the environment's index, the set
``mesh:beacons:<environment>`` (``default`` for the default environment).  Every
``hello_interval`` it reads the index and fetches the entries (``MGET``, 256 keys a
call, all pipelined), and hands each new one to discovery as a received datagram
(:meth:`transport.mesh.discovery.Discovery.handle_datagram`): the PeerTable and its
rules stay the one truth.  An index entry whose key has expired is removed by the
reader that finds it.  A monitor reads every environment (the set
``mesh:environments``).  On close a component replaces its entry with its ``bye``
datagram (kept ``expiry`` seconds): readers drop it at once, as a multicast ``bye``
makes them, and a ``bye`` is authenticated like one, which a deleted key is not.

Why an index and not ``SCAN MATCH mesh:beacon:*``: SCAN walks the whole keyspace of the
database (every key of every application that shares it) on every read; the index costs
a reader only the entries of its own environment.  Each read is still O(entries): every
component reads every entry of its environment every ``hello_interval`` (as it hears
every multicast hello), so Redis serves N x N entries per interval for N components;
docs/mesh.md has the figures.

Why RESP by hand (:mod:`transport.mesh.redis_wire`) rather than the ``redis`` package:
its asyncio client cannot run under trio, and its synchronous client would hold a
worker thread per call (``trio.to_thread``), with cancellation that cannot interrupt
a call in flight.  Eight commands of RESP over a trio TCP stream are ~150 lines that
cancel cleanly, and add no dependency (the etcd client made the same choice, for the
same reasons: engine/cluster/etcd.py).

Redis unreachable (or answering errors): one WARNING naming the URL (never its
password) and the error, attempts again with backoff (0.5 s doubling up to 30 s), one
INFO when it works again; :meth:`RedisRegistry.problems` says what is wrong meanwhile.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import trio

from transport.mesh.redis_wire import (
    RedisUrl, Reply, RespError, RespParser, RespProtocolError, encode_command, parse_redis_url,
)
from transport.mesh.seeds import Address, Outage

KEY_PREFIX = "mesh"
ENVIRONMENTS_KEY = f"{KEY_PREFIX}:environments"
DEFAULT_ENVIRONMENT = "default"
MGET_CHUNK = 256            # keys per MGET (a reply of ~256 beacons: ~100 KB)
CONNECT_TIMEOUT = 5.0
BYE_TIMEOUT = 1.0           # a closing component waits at most this long to say bye
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
INDEX_TTL = 3600.0          # an index no component refreshes for this long goes
log = logging.getLogger(__name__)

# What a failed attempt raises: the connection is dropped and made again later.
FAILURES = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            RespError, RespProtocolError)

Command = Sequence[bytes | str | int]


def environment_name(environment: str) -> str:
    return environment or DEFAULT_ENVIRONMENT


def beacon_key(environment: str, peer_id: str) -> str:
    return f"{KEY_PREFIX}:beacon:{environment_name(environment)}:{peer_id}"


def index_key(environment: str) -> str:
    return f"{KEY_PREFIX}:beacons:{environment_name(environment)}"


def _root_cause(exc: BaseException) -> BaseException:
    """trio.open_tcp_stream's "all attempts failed" OSError hides the reason in a group."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return cause if isinstance(exc, OSError) and cause is not None else exc


def error_name(exc: BaseException) -> str:
    """For the start-up line: ``ConnectionRefusedError``, ``TooSlowError``, ``WRONGPASS``."""
    exc = _root_cause(exc)
    if isinstance(exc, RespError):
        return str(exc).split(" ", 1)[0] or "RespError"
    return type(exc).__name__


def error_text(exc: BaseException) -> str:
    root = _root_cause(exc)
    if isinstance(root, trio.TooSlowError):
        return "TooSlowError (no answer in time)"
    if isinstance(root, RespError):
        return f"Redis answered: {root}"
    return f"{type(root).__name__}: {root}"


class RedisConnection:
    """One connection: pipelined commands, replies in order (RESP2)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = RespParser()
        self.in_flight = False      # a pipeline was cut off: replies would be misread

    @property
    def local_ip(self) -> str:
        """This end's address, as Redis sees it: where peers can reach this host."""
        return str(self.stream.socket.getsockname()[0])

    async def pipeline(self, commands: Sequence[Command]) -> list[Reply]:
        """Send every command at once; their replies in order (errors in place)."""
        if not commands:
            return []
        self.in_flight = True
        await self.stream.send_all(b"".join(encode_command(*c) for c in commands))
        replies: list[Reply] = []
        while len(replies) < len(commands):
            got, reply = self.parser.next_reply()
            if got:
                replies.append(reply)
                continue
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            self.parser.feed(data)
        self.in_flight = False
        return replies

    async def call(self, *args: bytes | str | int) -> Reply:
        [reply] = await self.pipeline([args])
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def open_connection(url: RedisUrl) -> RedisConnection:
    """Connect, authenticate (when the URL has a password) and select the database."""
    stream = await trio.open_tcp_stream(url.host, url.port)
    conn = RedisConnection(stream)
    try:
        if url.password is not None:
            user = [url.username] if url.username else []
            await conn.call("AUTH", *user, url.password)
        if url.db:
            await conn.call("SELECT", url.db)
    except BaseException:
        await conn.aclose()
        raise
    return conn


def _raise_errors(replies: list[Reply]) -> None:
    for reply in replies:
        if isinstance(reply, RespError):
            raise reply


def _strings(reply: Reply) -> list[str]:
    if not isinstance(reply, list):
        return []
    return [r.decode("utf-8", "replace") for r in reply if isinstance(r, bytes)]


class RedisRegistry:
    """Keep this component's beacon in Redis and feed the others' to ``deliver``.

    ``entry(op, host)``: the datagram to store (``op`` "hello" or "bye"; ``host``: this
    end's address as Redis sees it, for an endpoint bound to 0.0.0.0), None for a
    component that does not announce.  ``deliver(data, source)``: a datagram read, with
    a source naming its key (one per entry, as one socket per component).
    ``environment``: the one this component writes to and reads; ``read_all``: read
    every environment (the monitor)."""

    def __init__(self, url: str, *, me_id: str | None, environment: str, read_all: bool,
                 hello_interval: float, expiry: float, max_entries: int,
                 entry: Callable[[str, str], bytes | None],
                 deliver: Callable[[bytes, Address], None]) -> None:
        self.url = parse_redis_url(url)
        self.me_id = me_id
        self.environment = environment
        self.read_all = read_all
        self.hello_interval = hello_interval
        self.expiry = expiry
        self.max_entries = max_entries
        self.entry = entry
        self.deliver = deliver
        self.outage = Outage()
        self._last_error_name = ""
        self.connected = False
        self.first_attempt = trio.Event()   # connected and read once, or failed once
        self._seen: dict[str, bytes] = {}   # key -> the entry last delivered
        # writes/reads: cycles done; delivered: entries handed to discovery (new ones
        # only: an entry not rewritten since the last read is not fed twice); stale:
        # index ids whose key had expired, removed; truncated: entries past max_entries.
        self.stats = {"writes": 0, "reads": 0, "delivered": 0, "entries": 0, "stale": 0,
                      "truncated": 0, "errors": 0}

    # -- what discovery shows ---------------------------------------------------------
    def describe(self) -> str:
        if self.outage:
            return f"redis {self.url} unreachable ({self._last_error_name})"
        if not self.connected:
            return f"redis {self.url} connecting"
        n = self.stats["entries"]
        return f"redis {self.url} ok ({n} {'entry' if n == 1 else 'entries'})"

    def problems(self, now: float) -> list[str]:
        if not self.outage or self.outage.since is None:
            return []
        return [f"redis {self.url} unreachable since {now - self.outage.since:.0f} s: "
                f"{self.outage.error} ({self.outage.count} failed attempts)"]

    # -- running ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            conn: RedisConnection | None = None
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    conn = await open_connection(self.url)
                await self._session(conn)
            except FAILURES as exc:
                self._failed(exc)
            finally:
                self.connected = False
                if conn is not None:
                    await conn.aclose()
            await trio.sleep(min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(self.outage.count - 1, 16)))

    async def _session(self, conn: RedisConnection) -> None:
        try:
            while True:
                with trio.fail_after(max(self.expiry, 1.0)):
                    await self.cycle(conn)
                self.connected = True
                ended = self.outage.ok()
                if ended is not None:
                    log.info("discovery: redis %s reachable again, after %.0f s (%d failed "
                             "attempts)", self.url, trio.current_time() - ended[0], ended[1])
                self.first_attempt.set()
                await trio.sleep(self.hello_interval)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(BYE_TIMEOUT):
                await self.say_bye(conn)
            raise

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self._last_error_name = error_name(exc)
        text = error_text(exc)
        if self.outage.failed(text, trio.current_time()):
            log.warning("discovery: redis %s unreachable: %s; this component is not "
                        "registered there and finds no peers through it (trying again with "
                        "backoff up to %g s; logged again only once it works)", self.url,
                        text, BACKOFF_CAP)
        self.first_attempt.set()

    async def cycle(self, conn: RedisConnection) -> None:
        """One write of this component's entry and one read of everyone's."""
        await self._write(conn, "hello")
        await self._read(conn)

    async def _write(self, conn: RedisConnection, op: str) -> None:
        if self.me_id is None:
            return
        host = conn.local_ip
        data = self.entry(op, f"[{host}]" if ":" in host else host)
        if data is None:
            return
        env = environment_name(self.environment)
        ttl = max(1, int(self.expiry * 1000))
        commands: list[Command] = [("SET", beacon_key(env, self.me_id), data, "PX", ttl)]
        if op == "hello":
            index_ttl = int(INDEX_TTL * 1000)
            commands += [("SADD", index_key(env), self.me_id),
                         ("PEXPIRE", index_key(env), index_ttl),
                         ("SADD", ENVIRONMENTS_KEY, env),
                         ("PEXPIRE", ENVIRONMENTS_KEY, index_ttl)]
        _raise_errors(await conn.pipeline(commands))
        self.stats["writes"] += 1

    async def _read(self, conn: RedisConnection) -> None:
        if self.read_all:
            envs = sorted(_strings(await conn.call("SMEMBERS", ENVIRONMENTS_KEY)))
        else:
            envs = [environment_name(self.environment)]
        indexes = await conn.pipeline([("SMEMBERS", index_key(e)) for e in envs])
        _raise_errors(indexes)
        pairs = [(env, peer) for env, ids in zip(envs, indexes) for peer in _strings(ids)
                 if peer != self.me_id]
        if len(pairs) > self.max_entries:
            self.stats["truncated"] += len(pairs) - self.max_entries
            pairs = pairs[:self.max_entries]
        keys = [beacon_key(env, peer) for env, peer in pairs]
        chunks = [keys[i:i + MGET_CHUNK] for i in range(0, len(keys), MGET_CHUNK)]
        replies = await conn.pipeline([("MGET", *chunk) for chunk in chunks])
        _raise_errors(replies)
        values: list[Reply] = [v for r in replies if isinstance(r, list) for v in r]
        if len(values) != len(keys):
            raise RespProtocolError(f"MGET of {len(keys)} keys answered {len(values)} values")
        seen: dict[str, bytes] = {}
        stale: dict[str, list[str]] = {}
        for (env, peer), key, value in zip(pairs, keys, values):
            if not isinstance(value, bytes):
                stale.setdefault(env, []).append(peer)   # expired: its TTL passed
                continue
            seen[key] = value
            if self._seen.get(key) != value:   # a new write (the same one is no news)
                self.stats["delivered"] += 1
                self.deliver(value, (f"redis:{key}", 0))
        self._seen = seen
        self.stats["entries"] = len(seen)
        self.stats["reads"] += 1
        if stale:
            # (a component whose key expired and that writes again re-adds itself)
            cleanup: list[Command] = [("SREM", index_key(env), *ids) for env, ids in stale.items()]
            _raise_errors(await conn.pipeline(cleanup))
            self.stats["stale"] += sum(len(ids) for ids in stale.values())
        if self.read_all:
            empty = [env for env, ids in zip(envs, indexes) if not _strings(ids)]
            if empty:
                await conn.call("SREM", ENVIRONMENTS_KEY, *empty)

    async def say_bye(self, conn: RedisConnection | None) -> None:
        """Replace this component's entry with its ``bye`` (a fresh connection when the
        current one was cut off mid-pipeline)."""
        if self.me_id is None:
            return
        fresh = conn is None or conn.in_flight
        try:
            if fresh:
                conn = await open_connection(self.url)
            assert conn is not None
            await self._write(conn, "bye")
        except FAILURES as exc:
            log.debug("discovery: redis %s: bye not written: %s", self.url, error_text(exc))
        finally:
            if fresh and conn is not None:
                await conn.aclose()
