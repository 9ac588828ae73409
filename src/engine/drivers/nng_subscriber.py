"""``nng-subscriber`` (alias ``zeromq-subscriber``): messages of any nng Pub socket
become jobs (the Cocaine README's "ZeroMQ Subscriber", for publishing chains).

The driver opens an nng **Sub0** socket that dials ``endpoint`` (``"mode": "listen"``:
listens there, for publishers that dial) and subscribes to the ``topics`` prefixes
(default: everything).  A message is the maintenance channel's format
(engine/node/maintenance.py): the topic in UTF-8, a ``00`` byte, one msgpack value; so
an app can subscribe to another app's maintenance channel (``state``, ``fault``, the
``result.<driver>`` outcomes sinks publish).  nng matches a topic prefix against the
message's first bytes: ``result.`` is every sink's results, ``state`` also matches a
topic ``states``; ``"state\\u0000"`` is the topic ``state`` alone.

Each message is one job with the driver's ``emit``; payload ``{"topic", "data"}``, or
with ``"payload": "data"`` the value alone.  A message without the separator, or whose
body is not msgpack, is counted as an error and dropped.  Backpressure is the sinks'
rule: while the pool has no room the driver stops reading; nng's queue
(``nng-buffer`` messages) fills and then Sub0 drops (a Pub socket never waits for its
subscribers).  ``publish`` and ``max-message`` are the sinks' options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pynng
import trio
from transport.errors import BadMessage, CodecError
from transport.sockets import TrioSocket

from engine.drivers.base import Driver, DriverHost, submit_holding
from engine.drivers.nng_server import listen, parse_max_message, parse_nng_endpoint
from engine.drivers.nng_sink import SinkOptions, SinkOutcomes
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_bool, opt_number, opt_str
from engine.drivers.registry import register
from engine.errors import DriverError
from engine.node.maintenance import split_frame

MODES = ("dial", "listen")
PAYLOADS = ("event", "data")


@dataclass(frozen=True)
class NngSubscriberOptions(SinkOptions):
    topics: tuple[str, ...] = ("",)
    mode: str = "dial"
    payload: str = "event"
    nng_buffer: int = 1024


@register("nng-subscriber", "zeromq-subscriber")
class NngSubscriber(Driver[NngSubscriberOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.outcomes = SinkOutcomes(spec, self.options, self.stats)
        self.address: str | None = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> NngSubscriberOptions:
        check_keys(raw, ctx, ["endpoint", "mode", "topics", "payload", "publish", "max-message", "nng-buffer"])
        topics = raw.get("topics", [""])
        if isinstance(topics, str):
            topics = [topics]
        if not isinstance(topics, list) or not topics or not all(isinstance(t, str) for t in topics):
            raise ctx.error("topics", "a non-empty list of topic prefixes (strings; \"\": everything)", topics)
        return NngSubscriberOptions(
            endpoint=parse_nng_endpoint(raw, ctx), publish=opt_bool(raw, ctx, "publish", default=False),
            max_message=parse_max_message(raw, ctx), topics=tuple(dict.fromkeys(topics)),
            mode=opt_str(raw, ctx, "mode", default="dial", choices=MODES),
            payload=opt_str(raw, ctx, "payload", default="event", choices=PAYLOADS),
            nng_buffer=opt_number(raw, ctx, "nng-buffer", default=1024, minimum=1, integer=True))

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        options = self.options
        self.outcomes.bind(app)
        raw = pynng.Sub0(recv_max_size=options.max_message)
        for topic in options.topics:
            raw.subscribe(topic.encode("utf-8"))
        if options.mode == "listen":
            self.address = listen(raw, options.endpoint)   # (closes it and raises DriverError)
        else:
            try:
                raw.dial(options.endpoint, block=False)     # nng redials by itself, for ever
            except pynng.NNGException as exc:
                raw.close()
                raise DriverError(f"cannot dial {options.endpoint}: {exc}") from None
            self.address = options.endpoint
        sock = TrioSocket(raw, buffer=min(options.nng_buffer, 8192))
        try:
            async with trio.open_nursery() as jobs:
                task_status.started(self.address)
                while True:
                    message = await sock.recv()
                    self.stats.ticks += 1
                    try:
                        topic, data = split_frame(message)
                    except (CodecError, ValueError) as exc:
                        self.stats.failed(BadMessage(f"not topic + 00 + msgpack: {exc}"))
                        continue
                    payload = data if options.payload == "data" else {"topic": topic, "data": data}
                    job = await submit_holding(app, self.spec.emit, payload, self.stats)
                    jobs.start_soon(self.outcomes.follow, job, payload)
        finally:
            sock.close()

    def details(self) -> dict[str, Any]:
        return {"endpoint": self.address or self.options.endpoint, "mode": self.options.mode,
                "topics": list(self.options.topics), "payload": self.options.payload,
                "publish": self.options.publish}
