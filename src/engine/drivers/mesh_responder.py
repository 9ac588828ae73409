"""``mesh-responder``: the app answers mesh Requesters (docs/mesh.md) for the event
types it lists, as a :class:`transport.mesh.responder.Responder` advertised in its
namespace/key like any other.

Each request (a dict ``{"type": ..., ...}``, as the Requester sent it) becomes one job
of the app's pool, the whole dict as its payload; the job's event is the request's type
(``events`` as a list: a pattern such as ``user.*`` gives the request's own type, e.g.
``user.created``) or the name ``events`` maps it to (``{"user.*": "users"}``).  The
job's reply is the answer: one value, or a stream (``CHUNK``...``CHOKE``, forwarded as
the slave produces it: a Requester's ``send`` gets the list of chunks).  A chunked
request's chunks go to the handler as they arrive.

Errors reach the Requester typed, with their codes: ``queue-full`` (retryable: the
Requester tries again, on another Responder of the same types when there is one: an app
hosted by several nodes is several Responders, balanced round robin by the Requesters),
``app-broken``, ``shutting-down``, ``handler`` (the exception's type and message),
``slave-died``, ``request-timeout``...  A Requester that gives up (timeout, cancel)
cancels the job.

The answer comes from the job's callbacks (an RpcServer ``Deferred``: no task per
request), as for the node's control endpoint; the Responder's limits are the driver's
``max-inflight``, ``max-message``, ``max-connections``, ``idle-timeout``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
from transport.errors import BadMessage, TransportError
from transport.mesh.peers import matches
from transport.mesh.responder import Responder

from engine.drivers.base import NO_ROOM, Driver, DriverHost, SubmittedJob, sole_leaf
from engine.drivers.mesh_options import (MESH_KEYS, MeshPlace, opt_seconds, opt_text, parse_names,
                                         parse_place)
from engine.drivers.native import LIMIT_KEYS, ServerLimits, parse_limits
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_bool, opt_number
from engine.drivers.registry import register
from engine.errors import DriverError


@dataclass(frozen=True)
class MeshResponderOptions:
    # (request type or pattern, the job's event; None: the request's own type).
    # None: the driver's ``emit`` is the one type.
    events: tuple[tuple[str, str | None], ...] | None = None
    place: MeshPlace = field(default_factory=MeshPlace)
    max_inflight: int = 10_000
    spin: bool = True
    limits: ServerLimits = field(default_factory=ServerLimits)
    subset: str = ""             # cote's subset: Requesters may direct requests to it


@register("mesh-responder")
class MeshResponder(Driver[MeshResponderOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.responder: Responder | None = None
        self.app_name = ""

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> MeshResponderOptions:
        check_keys(raw, ctx, ["events", "max-inflight", "spin", "subset", *MESH_KEYS,
                              *LIMIT_KEYS])
        if raw.get("idle-timeout") is not None:
            opt_seconds(raw, ctx, "idle-timeout")   # (parse_limits would overflow on a huge int)
        return MeshResponderOptions(
            events=parse_names(raw, ctx, "events", required=False), place=parse_place(raw, ctx),
            max_inflight=opt_number(raw, ctx, "max-inflight", default=10_000, minimum=1, integer=True),
            spin=opt_bool(raw, ctx, "spin", default=True), limits=parse_limits(raw, ctx),
            subset=opt_text(raw, ctx, "subset"))

    @property
    def events(self) -> tuple[tuple[str, str | None], ...]:
        return self.options.events or ((self.spec.emit, self.spec.emit),)

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        from engine.node.control import reply_later  # answers from the job's callbacks, no task

        self.app_name = app.name
        options, stats = self.options, self.stats
        limits = options.limits
        responder = Responder(responds_to=[t for t, _ in self.events], max_inflight=options.max_inflight,
                              spin=options.spin, max_message=limits.max_message,
                              max_connections=limits.max_connections, idle_timeout=limits.idle_timeout,
                              subset=options.subset, **options.place.component_kwargs(app.name))

        def count(job: SubmittedJob) -> None:
            if job.error is None:
                stats.done += 1
            else:
                stats.failed(job.error)

        def handler_for(pattern: str, event: str | None) -> Any:
            # A plain def: it runs where the request arrives and answers with a Deferred
            # (engine/node/control.py), so a request costs no task of its own.
            def handle(request: Any, chunks: Any = None) -> Any:
                stats.ticks += 1
                name = event if event is not None else _own_type(pattern, request)
                try:
                    job = app.submit(name, request, chunks)
                except NO_ROOM:
                    stats.skipped += 1
                    raise          # typed, to the Requester (queue-full is retryable)
                stats.submitted += 1
                job.add_done_callback(count)
                return reply_later(job)
            return handle

        for pattern, event in self.events:
            responder.on(pattern)(handler_for(pattern, event))
        self.responder = responder
        failure: DriverError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(responder.run)
            except BaseException as exc:
                leaf = sole_leaf(exc)
                if not isinstance(leaf, (TransportError, OSError, ValueError)):
                    raise
                failure = DriverError(f"mesh responder {responder.name!r} could not start: {leaf}")
            else:
                task_status.started(responder.address)
        if failure is not None:
            raise failure

    async def drain(self, timeout: float) -> None:
        """A ``bye`` (Requesters send their next requests elsewhere), then the requests
        in flight are answered: none is cut off mid-run and retried elsewhere."""
        if self.responder is not None:
            await self.responder.drain(timeout, close=False)

    def details(self) -> dict[str, Any]:
        responder = self.responder
        return {**self.options.place.describe(self.app_name or self.spec.name),
                "events": {t: e or "(its type)" for t, e in self.events},
                "address": responder.address if responder else None,
                "id": responder.id if responder else None,
                "connections": responder.server.connections if responder and responder.server else 0}


def _own_type(pattern: str, request: Any) -> str:
    """The job's event for a request listed by ``pattern`` alone: the request's own
    type, which must be one the pattern covers (the Responder routed the request by
    the envelope's event, which a client other than a Requester may set apart from
    the type inside: it must not reach events the manifest did not list)."""
    kind = request.get("type") if isinstance(request, dict) else None
    if not isinstance(kind, str) or not kind or "*" in kind:
        raise BadMessage("a mesh request is a dict with a 'type' naming one event (no wildcard)")
    if kind != pattern and not matches(pattern, kind):
        raise BadMessage(f"request type {kind[:100]!r} is not one of {pattern!r}")
    return kind
