"""``mesh-subscriber``: events from mesh Publishers (docs/mesh.md) become jobs.

The driver runs a :class:`transport.mesh.pubsub.Subscriber` in its namespace/key that
subscribes to ``types`` (patterns allowed: ``user.*`` one segment, ``**`` any number),
and dials every Publisher whose ``broadcasts`` overlap them, as they are discovered.
Each event is one job: its event is the driver's ``emit`` (``types`` as a list) or the
name ``types`` maps the first matching pattern to (``{"a.*": "from_a"}``); its payload
``{"type": the event's type, "data": what was published, "publisher": its name}``, or
with ``"payload": "data"`` the published data alone.

Backpressure is the sinks' rule: while the pool has no room the driver stops reading
(``held`` counts it).  Pub/sub cannot slow a Publisher down, though (it never waits for
a subscriber): events wait in the Subscriber's buffer (``buffer`` events) and then in
nng's queue (``nng-buffer`` frames), and past that the oldest are dropped by nng,
counted from the sequence gaps as ``dropped`` in ``info``.  With ``publish``, each job's
outcome goes to the app's maintenance channel under ``result.<driver>``, as for sinks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
from transport.codec import DEFAULT_MAX_MESSAGE
from transport.errors import RemoteError, TransportError, error_to_body
from transport.mesh.peers import matches
from transport.mesh.pubsub import Event, Subscriber
from transport.rpc.connection import MIN_MESSAGE

from engine.drivers.base import Driver, DriverHost, SubmittedJob, run_job, sole_leaf, submit_holding
from engine.drivers.mesh_options import MESH_KEYS, MeshPlace, opt_seconds, parse_names, parse_place
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_bool, opt_number, opt_str
from engine.drivers.registry import register
from engine.errors import DriverError

PAYLOADS = ("event", "data")


@dataclass(frozen=True)
class MeshSubscriberOptions:
    # (type pattern, the job's event; None: the driver's emit)
    types: tuple[tuple[str, str | None], ...] = (("**", None),)
    place: MeshPlace = field(default_factory=MeshPlace)
    payload: str = "event"
    publish: bool = False
    buffer: int = 10_000
    nng_buffer: int = 1024
    max_links: int = 64
    dial_timeout: float = 3.0
    max_message: int = DEFAULT_MAX_MESSAGE


@register("mesh-subscriber")
class MeshSubscriber(Driver[MeshSubscriberOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.subscriber: Subscriber | None = None
        self.app_name = ""
        self._events: dict[str, str] = {}   # type -> the job's event (cached)

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> MeshSubscriberOptions:
        check_keys(raw, ctx, ["types", "payload", "publish", "buffer", "nng-buffer", "max-links",
                              "dial-timeout", "max-message", *MESH_KEYS])
        types = parse_names(raw, ctx, "types", required=True)
        assert types is not None
        return MeshSubscriberOptions(
            types=types, place=parse_place(raw, ctx),
            payload=opt_str(raw, ctx, "payload", default="event", choices=PAYLOADS),
            publish=opt_bool(raw, ctx, "publish", default=False),
            buffer=opt_number(raw, ctx, "buffer", default=10_000, minimum=1, integer=True),
            nng_buffer=opt_number(raw, ctx, "nng-buffer", default=1024, minimum=1, integer=True),
            max_links=opt_number(raw, ctx, "max-links", default=64, minimum=1, integer=True),
            dial_timeout=opt_seconds(raw, ctx, "dial-timeout", default=3.0, minimum=0.001),
            max_message=opt_number(raw, ctx, "max-message", default=DEFAULT_MAX_MESSAGE,
                                   minimum=MIN_MESSAGE, integer=True))

    def event_for(self, kind: str) -> str:
        """The job's event for an event of type ``kind`` (the first pattern that covers it)."""
        name = self._events.get(kind)
        if name is None:
            name = self.spec.emit
            for pattern, event in self.options.types:
                if matches(pattern, kind):
                    name = event or self.spec.emit
                    break
            if len(self._events) < 10_000:
                self._events[kind] = name
        return name

    def payload_of(self, event: Event) -> Any:
        if self.options.payload == "data":
            return event.data
        return {"type": event.topic, "data": event.data, "publisher": event.publisher}

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.app_name = app.name
        options = self.options
        subscriber = Subscriber(subscribes_to=[t for t, _ in options.types], buffer=options.buffer,
                                nng_buffer=options.nng_buffer, max_links=options.max_links,
                                dial_timeout=options.dial_timeout, max_message=options.max_message,
                                **options.place.component_kwargs(app.name))
        self.subscriber = subscriber
        failure: DriverError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(subscriber.run)
            except BaseException as exc:
                leaf = sole_leaf(exc)
                if not isinstance(leaf, (TransportError, OSError, ValueError)):
                    raise
                failure = DriverError(f"mesh subscriber {subscriber.name!r} could not start: {leaf}")
            else:
                task_status.started()
                try:
                    async with trio.open_nursery() as jobs:
                        async for event in subscriber:
                            self.stats.ticks += 1
                            payload = self.payload_of(event)
                            # Held while the pool is full: the subscription backs up (module doc).
                            job = await submit_holding(app, self.event_for(event.topic), payload,
                                                       self.stats)
                            jobs.start_soon(self._follow, app, job, payload)
                finally:
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _follow(self, app: DriverHost, job: SubmittedJob, payload: Any) -> None:
        try:
            outcome = {"result": await run_job(job, self.stats)}
        except RemoteError as exc:
            outcome = {"error": error_to_body(exc)}
        if self.options.publish:
            app.publish(f"result.{self.spec.name}", {"driver": self.spec.name, "payload": payload, **outcome})

    def details(self) -> dict[str, Any]:
        subscriber = self.subscriber
        stats = subscriber.stats if subscriber else {}
        return {**self.options.place.describe(self.app_name or self.spec.name),
                "types": {t: e or self.spec.emit for t, e in self.options.types},
                "payload": self.options.payload, "publish": self.options.publish,
                "publishers": subscriber.links if subscriber else 0,
                "received": stats.get("received", 0), "dropped": stats.get("dropped", 0)}
