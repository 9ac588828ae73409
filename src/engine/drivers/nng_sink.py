"""``nng-sink`` (alias ``zeromq-sink``): fire-and-forget jobs from any nng Push socket.

A producer dials ``endpoint`` with an nng **Push0** socket and sends msgpack payloads;
nothing comes back on that socket.  With ``"publish": true`` each job's outcome is
published on the app's pubsub channel under the topic ``result.<driver name>``
(``{"result": value}`` or ``{"error": {...}}``, plus the ``payload``).

Backpressure: while the pool is full the driver stops reading; nng's receive buffer
fills, then the producers' sends block (Push0 has no drop policy), so a fast producer
is slowed down rather than losing jobs.  Payloads that are not msgpack are counted as
errors and dropped: there is nobody to answer.  ``max-message`` (bytes, default 16 MiB)
is nng's receive limit: nng drops a bigger message and closes its producer's pipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pynng
import trio
from transport.codec import DEFAULT_MAX_MESSAGE, unpack
from transport.errors import BadMessage, CodecError, RemoteError, error_to_body
from transport.sockets import TrioSocket

from engine.drivers.base import Driver, DriverHost, DriverStats, SubmittedJob, run_job, submit_holding
from engine.drivers.nng_server import listen, parse_max_message, parse_nng_endpoint
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_bool
from engine.drivers.registry import register

# Messages nng may hold for us while we are not reading: small, so backpressure
# reaches producers quickly instead of piling up here.
SINK_BUFFER = 16


@dataclass(frozen=True)
class SinkOptions:
    endpoint: str
    publish: bool = False
    max_message: int = DEFAULT_MAX_MESSAGE


def parse_sink_options(raw: Any, ctx: OptionContext) -> SinkOptions:
    check_keys(raw, ctx, ["endpoint", "publish", "max-message"])
    return SinkOptions(endpoint=parse_nng_endpoint(raw, ctx),
                       publish=opt_bool(raw, ctx, "publish", default=False),
                       max_message=parse_max_message(raw, ctx))


class SinkOutcomes:
    """Counts a sink's jobs and, if asked, publishes each outcome."""

    def __init__(self, spec: DriverSpec, options: SinkOptions, stats: DriverStats) -> None:
        self.spec, self.options, self.stats = spec, options, stats
        self.publish: Callable[[str, Any], None] | None = None
        self.topic = f"result.{spec.name}"

    def bind(self, app: DriverHost) -> None:
        if self.options.publish:
            self.publish = app.publish   # the app's maintenance channel

    async def follow(self, job: SubmittedJob, payload: Any) -> None:
        try:
            outcome = {"result": await run_job(job, self.stats)}
        except RemoteError as exc:
            outcome = {"error": error_to_body(exc)}
        if self.publish is not None:
            self.publish(self.topic, {"driver": self.spec.name, "payload": payload, **outcome})


@register("nng-sink", "zeromq-sink")
class NngSink(Driver[SinkOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.outcomes = SinkOutcomes(spec, self.options, self.stats)
        self.address: str | None = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> SinkOptions:
        return parse_sink_options(raw, ctx)

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        self.outcomes.bind(app)
        raw = pynng.Pull0(recv_max_size=self.options.max_message)
        self.address = listen(raw, self.options.endpoint)
        sock = TrioSocket(raw, buffer=SINK_BUFFER)
        try:
            async with trio.open_nursery() as jobs:
                task_status.started(self.address)
                while True:
                    body = await sock.recv()
                    self.stats.ticks += 1
                    try:
                        payload = unpack(body)
                    except CodecError as exc:
                        self.stats.failed(BadMessage(f"payload is not msgpack: {exc}"))
                        continue
                    job = await submit_holding(app, self.spec.emit, payload, self.stats)
                    jobs.start_soon(self.outcomes.follow, job, payload)
        finally:
            sock.close()

    def details(self) -> dict[str, Any]:
        return {"endpoint": self.address or self.options.endpoint, "publish": self.options.publish,
                "max_message": self.options.max_message}
