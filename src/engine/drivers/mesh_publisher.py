"""``mesh-publisher``: the app's handlers publish on the mesh (``engine.publish``).

The driver runs one :class:`transport.mesh.pubsub.Publisher` for its app, advertised in
its namespace/key with ``broadcasts`` (default: nothing, which Subscribers read as
"everything"), for as long as the app runs.  It submits no jobs: it is where the app's
events leave.  A handler publishes with::

    from engine import publish             # (engine.api)
    publish("a.done", {"id": 7})           # sync handlers
    await apublish("a.done", {"id": 7})    # async def handlers

which asks the slave's node (``ENGINE_NODE``) to run the control verb ``mesh-publish``
with ``{"app", "type", "data", "driver"?}``; the verb finds the app's ``mesh-publisher``
driver (the one named ``driver``, else the first whose ``broadcasts`` cover the type)
and publishes on its Publisher, answering ``{"driver", "subscribers"}`` (the
Subscribers connected right now: pub/sub keeps no history, so an event published with
none is seen by nobody).  Why the node: a slave is short-lived and there may be many;
the node's Publisher is one stable mesh peer per app that Subscribers find and stay
linked to across slaves coming and going, and the verb is sealed with the node's token
like any other.

Errors reach the handler typed: ``unknown-event`` (the app has no mesh-publisher for
that type), ``bad-message`` (no type; a type the named driver does not broadcast;
data msgpack cannot carry), ``queue-full`` (``high-water`` events are waiting to be
written), ``app-not-found``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pynng
import trio
from transport.errors import BadMessage, CodecError, QueueFull, TransportError, UnknownEvent, Unreachable
from transport.mesh.peers import matches
from transport.mesh.pubsub import Publisher

from engine.drivers.base import Driver, DriverHost, sole_leaf
from engine.drivers.mesh_options import MESH_KEYS, MeshPlace, parse_place
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_number
from engine.drivers.registry import register
from engine.drivers.scheduler import AppsOfNode
from engine.errors import DriverError

# The control verb's name (engine/node/verbs.py's table).
VERB = "mesh-publish"


@dataclass(frozen=True)
class MeshPublisherOptions:
    broadcasts: tuple[str, ...] = ()
    place: MeshPlace = field(default_factory=MeshPlace)
    high_water: int = 100_000
    nng_buffer: int = 128


@register("mesh-publisher")
class MeshPublisher(Driver[MeshPublisherOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.publisher: Publisher | None = None
        self.app_name = ""

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> MeshPublisherOptions:
        check_keys(raw, ctx, ["broadcasts", "high-water", "nng-buffer", *MESH_KEYS])
        broadcasts = raw.get("broadcasts", [])
        if isinstance(broadcasts, str):
            broadcasts = [broadcasts]
        if not isinstance(broadcasts, list) or not all(isinstance(t, str) and t for t in broadcasts):
            raise ctx.error("broadcasts", "a list of event types (patterns allowed)", broadcasts)
        return MeshPublisherOptions(
            broadcasts=tuple(dict.fromkeys(broadcasts)), place=parse_place(raw, ctx),
            high_water=opt_number(raw, ctx, "high-water", default=100_000, minimum=1, integer=True),
            nng_buffer=opt_number(raw, ctx, "nng-buffer", default=128, minimum=1, integer=True))

    def broadcasts(self, kind: str) -> bool:
        """Whether this publisher carries events of type ``kind``."""
        return not self.options.broadcasts or any(matches(p, kind) for p in self.options.broadcasts)

    def publish(self, kind: str, data: Any) -> dict[str, Any]:
        """Publish one event now (sync): what the verb does.  Counted as a tick; a refusal
        (QueueFull, data that cannot be encoded) as an error."""
        publisher = self.publisher
        self.stats.ticks += 1
        self.stats.submitted += 1
        if publisher is None:
            error = Unreachable(f"{self.spec.name}: the mesh publisher is not running (retry)")
            self.stats.failed(error)
            raise error
        try:
            publisher.publish(kind, data)
        except QueueFull as exc:
            self.stats.failed(exc)
            raise
        except CodecError as exc:
            bad = BadMessage(str(exc))
            self.stats.failed(bad)
            raise bad from None
        self.stats.done += 1
        return {"driver": self.spec.name, "subscribers": publisher.subscribers}

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.app_name = app.name
        options = self.options
        publisher = Publisher(broadcasts=options.broadcasts, high_water=options.high_water,
                              nng_buffer=options.nng_buffer, **options.place.component_kwargs(app.name))
        failure: DriverError | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(publisher.run)
                except BaseException as exc:
                    leaf = sole_leaf(exc)
                    if not isinstance(leaf, (TransportError, OSError, ValueError, pynng.NNGException)):
                        raise
                    failure = DriverError(f"mesh publisher {publisher.name!r} could not start: {leaf}")
                else:
                    self.publisher = publisher
                    task_status.started(publisher.address)
        finally:
            self.publisher = None
        if failure is not None:
            raise failure

    def details(self) -> dict[str, Any]:
        publisher = self.publisher
        return {**self.options.place.describe(self.app_name or self.spec.name),
                "broadcasts": list(self.options.broadcasts) or ["(everything)"],
                "address": publisher.address if publisher else None,
                "subscribers": publisher.subscribers if publisher else 0,
                "published": publisher.stats["published"] if publisher else 0}


# -- the node side: the control verb (engine/node/verbs.py's table) ---------------------

async def mesh_publish_verb(node: AppsOfNode, args: Any) -> dict[str, Any]:
    """``mesh-publish`` ``{"app", "type", "data", "driver"?}`` -> ``{"driver", "subscribers"}``."""
    if not isinstance(args, dict) or not isinstance(args.get("app"), str) or not args["app"]:
        raise BadMessage(f'{VERB} expects {{"app", "type", "data", "driver"?}}')
    kind, name = args.get("type"), args.get("driver")
    if not isinstance(kind, str) or not kind or "*" in kind:
        raise BadMessage(f"{VERB}: type must name one event (a non-empty string, no wildcard), "
                         f"got {kind!r:.60}")
    if name is not None and not isinstance(name, str):
        raise BadMessage(f"{VERB}: driver must be a driver's name, got {name!r:.60}")
    drivers = node.get(args["app"]).drivers
    if name is not None:
        driver = drivers.get(name)
        if not isinstance(driver, MeshPublisher):
            raise UnknownEvent(f"app {args['app']} has no mesh-publisher driver {name!r}")
        if not driver.broadcasts(kind):
            raise BadMessage(f"{VERB}: driver {name!r} of app {args['app']} does not broadcast "
                             f"{kind!r} (broadcasts: {', '.join(driver.options.broadcasts)})")
        return driver.publish(kind, args.get("data"))
    for driver in drivers.values():
        if isinstance(driver, MeshPublisher) and driver.broadcasts(kind):
            return driver.publish(kind, args.get("data"))
    raise UnknownEvent(f"app {args['app']} has no mesh-publisher driver broadcasting {kind!r}")
