"""``native-server`` and ``native-sink``: the engine's own protocol (transport/rpc/).

Clients use :class:`transport.rpc.RpcClient` (or any binding speaking the envelope
format of docs/protocol.md): ``REQUEST [target, event, payload]``; the target and
event are ignored (the manifest's ``emit`` is the event), so any client of the
node's control endpoint works unchanged against a driver's own ``endpoint``.

native-server
    Answers ``RESULT value``, or ``CHUNK``… ``CHOKE`` as the handler streams them
    (chunks are forwarded as the slave produces them), or ``ERROR {code,...}``;
    ``queue-full`` when the pool has no room.  Without ``endpoint`` the driver opens
    no socket: the app is reached through the node's control endpoint, which speaks
    the same protocol.  On a node in a cluster with peers, requests are balanced like
    the control endpoint's (engine/cluster.py: run here, or on a less-loaded peer when
    this node is saturated); alone, a job is answered straight from its callbacks.
native-sink
    Answers ``RESULT null`` as soon as the job is *accepted*; while the pool is full
    the acknowledgement waits, so producers that wait for it are slowed down (the
    sink's backpressure).  With ``"publish": true`` outcomes go to the app's pubsub
    channel under ``result.<driver name>``, as for nng-sink.

Both take the RpcServer's limits (docs/protocol.md, "Limits"): ``max-message`` (bytes,
default 16 MiB), ``max-connections`` (default 1024), ``idle-timeout`` (s, default 300;
``null``: never).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
from transport.codec import DEFAULT_MAX_MESSAGE
from transport.errors import RemoteError, TransportError
from transport.rpc import Request, RpcServer
from transport.rpc.connection import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS

from engine.errors import DriverError
from engine.drivers.base import (NO_ROOM, ClusterRouter, Driver, DriverHost, SubmittedJob, bare_driver_errors,
                                 sole_leaf, submit_holding)
from engine.drivers.nng_server import parse_max_message
from engine.drivers.nng_sink import SinkOptions, SinkOutcomes
from engine.drivers.options import (DriverSpec, OptionContext, check_keys, check_url, opt_bool, opt_number,
                                    opt_str)
from engine.drivers.registry import register

RPC_SCHEMES = ("tcp://", "ipc://", "unix://", "nng+tcp://", "nng+ipc://")  # see transport/_links.py


LIMIT_KEYS = ["max-message", "max-connections", "idle-timeout"]


@dataclass(frozen=True)
class ServerLimits:
    """What a client can make the driver's RpcServer hold (its keyword arguments)."""

    max_message: int = DEFAULT_MAX_MESSAGE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT


def parse_limits(raw: Any, ctx: OptionContext) -> ServerLimits:
    """``max-message``, ``max-connections``, ``idle-timeout`` (``null``: never)."""
    connections: int = opt_number(raw, ctx, "max-connections", default=DEFAULT_MAX_CONNECTIONS,
                                  minimum=1, integer=True)
    idle: float | None = DEFAULT_IDLE_TIMEOUT
    if "idle-timeout" in raw:
        idle = raw["idle-timeout"]
        if idle is not None:
            idle = float(opt_number(raw, ctx, "idle-timeout"))
            if idle <= 0:
                raise ctx.error("idle-timeout", "a number of seconds > 0, or null (never)",
                                raw["idle-timeout"])
    return ServerLimits(parse_max_message(raw, ctx), connections, idle)


@dataclass(frozen=True)
class NativeOptions:
    endpoint: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)


@dataclass(frozen=True)
class NativeSinkOptions(SinkOptions):
    """A sink's options (``max_message`` as in ``limits``) and its server's limits."""

    limits: ServerLimits = field(default_factory=ServerLimits)


def _server(endpoint: str, handle: Any, limits: ServerLimits) -> RpcServer:
    return RpcServer(endpoint, handle, max_message=limits.max_message,
                     max_connections=limits.max_connections, idle_timeout=limits.idle_timeout)


def _endpoint(endpoint: str, ctx: OptionContext) -> str:
    if not endpoint.startswith(RPC_SCHEMES):
        raise ctx.error("endpoint", "an address like tcp://127.0.0.1:9100, ipc:///path or nng+tcp://127.0.0.1:9100",
                        endpoint)
    return check_url(endpoint, ctx, "endpoint")


async def _serve_rpc(server: RpcServer, task_status: trio.TaskStatus[Any]) -> None:
    """Run the server; failing to bind becomes a bare DriverError (raised outside any
    nursery, so the app sees the DriverError itself, not an exception group)."""
    failure: DriverError | None = None
    async with trio.open_nursery() as nursery:
        try:
            address = await nursery.start(server.run)
        except BaseException as exc:
            leaf = sole_leaf(exc)  # the server's own nursery wraps its failure
            if not isinstance(leaf, (TransportError, OSError)):
                raise
            failure = DriverError(f"cannot listen on {server.requested_address}: {leaf}")
        else:
            task_status.started(address)
    if failure is not None:
        raise failure


@register("native-server")
class NativeServer(Driver[NativeOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.server: RpcServer | None = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> NativeOptions:
        check_keys(raw, ctx, ["endpoint", *LIMIT_KEYS])
        endpoint = opt_str(raw, ctx, "endpoint", default=None)
        return NativeOptions(endpoint=None if endpoint is None else _endpoint(endpoint, ctx),
                             limits=parse_limits(raw, ctx))

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        from engine.node.control import reply_later  # answers from the job's callbacks, no task

        stats = self.stats

        def count(job: SubmittedJob) -> None:
            if job.error is None:
                stats.done += 1
            else:
                stats.failed(job.error)

        def handle(req: Request) -> Any:
            stats.ticks += 1
            node = app.node
            cluster = node.cluster if node is not None else None
            if cluster is not None and cluster.has_peers and req.chunks is None:
                return self._balanced(cluster, app.name, req.payload)  # on a worker task
            try:
                job = app.submit(self.spec.emit, req.payload, req.chunks)
            except NO_ROOM:
                stats.skipped += 1
                raise
            stats.submitted += 1
            job.add_done_callback(count)
            return reply_later(job)

        if self.options.endpoint is None:
            task_status.started(None)
            await trio.sleep_forever()
        self.server = _server(self.options.endpoint, handle, self.options.limits)
        await _serve_rpc(self.server, task_status)

    async def _balanced(self, cluster: ClusterRouter, app_name: str, payload: Any) -> Any:
        try:
            reply = await cluster.serve(app_name, self.spec.emit, payload)
        except NO_ROOM:
            self.stats.skipped += 1  # no node of the cluster had room
            raise
        except RemoteError as exc:
            self.stats.submitted += 1
            self.stats.failed(exc)
            raise
        self.stats.submitted += 1
        self.stats.done += 1
        return reply

    def details(self) -> dict[str, Any]:
        endpoint = self.server.address if self.server else self.options.endpoint
        return {"endpoint": endpoint or "(node control)"}


@register("native-sink")
class NativeSink(Driver[NativeSinkOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.outcomes = SinkOutcomes(spec, self.options, self.stats)
        self.server: RpcServer | None = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> NativeSinkOptions:
        check_keys(raw, ctx, ["endpoint", "publish", *LIMIT_KEYS])
        limits = parse_limits(raw, ctx)
        return NativeSinkOptions(endpoint=_endpoint(opt_str(raw, ctx, "endpoint"), ctx),
                                 publish=opt_bool(raw, ctx, "publish", default=False),
                                 max_message=limits.max_message, limits=limits)

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.outcomes.bind(app)
        with bare_driver_errors():
            async with trio.open_nursery() as nursery:
                async def handle(req: Request) -> None:
                    self.stats.ticks += 1
                    job = await submit_holding(app, self.spec.emit, req.payload, self.stats)
                    nursery.start_soon(self.outcomes.follow, job, req.payload)
                    return None

                self.server = _server(self.options.endpoint, handle, self.options.limits)
                await _serve_rpc(self.server, task_status)

    def details(self) -> dict[str, Any]:
        endpoint = self.server.address if self.server else self.options.endpoint
        return {"endpoint": endpoint, "publish": self.options.publish}
