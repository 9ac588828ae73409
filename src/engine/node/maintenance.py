"""The per-app maintenance channel: an nng Pub0 socket publishing the app's state.

Every message is ``topic`` (UTF-8) + ``b"\\0"`` + msgpack body, so an nng Sub0
subscriber in any language filters by prefix: subscribe to ``b"state\\0"`` for the
app's state (at least once a second), ``b"result."`` for the outcomes sinks publish
(``result.<driver>``), ``b"fault\\0"`` for the failures of the app's parts (a slave, its
link, a driver: ``{"seq", "time", "part", "kind", "reason"}``, each once, within a
second; docs/architecture.md, "Faults"), or ``b""`` for everything.  See
docs/drivers.md for the body.

Pub0 never blocks: a subscriber too slow to keep up loses messages; the publisher
(and so the app) never waits for it.  The state's ``seq`` lets a reader spot gaps.
"""
from __future__ import annotations

import time
from typing import Any, Protocol

import pynng
import trio
from transport.bind_hosts import bind_endpoint
from transport.codec import pack
from transport.errors import CodecError, TransportError
from transport.sockets import TrioSocket

from engine.errors import DriverError

STATE_TOPIC = "state"
FAULT_TOPIC = "fault"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:0"   # the node's choice: a free loopback port
INTERVAL = 1.0


def frame(topic: str, body: Any) -> bytes:
    return topic.encode("utf-8") + b"\0" + pack(body)


def split_frame(data: bytes) -> tuple[str, Any]:
    """Inverse of :func:`frame` (for readers: top, tests)."""
    from transport.codec import unpack

    topic, sep, body = data.partition(b"\0")
    if not sep:
        raise CodecError("maintenance frame without a topic separator")
    return topic.decode("utf-8", "replace"), unpack(body)


class RateMeter:
    """Pure: jobs/s from successive (time, finished-jobs counter) readings."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, now: float, count: int) -> float:
        if self.last is not None and now > self.last[0]:
            self.rate = max(0, count - self.last[1]) / (now - self.last[0])
        self.last = (now, count)
        return self.rate


class ReportingApp(Protocol):
    """What the channel reads of its app (:class:`engine.app.App`; ``top`` wraps an
    ``info`` reply it got over the wire in one).  A protocol, not the App: the app module
    imports this one."""

    @property
    def name(self) -> str: ...

    def info(self) -> dict[str, Any]:
        """The app's ``info`` (state, pool, drivers, limits)."""
        ...


def state_of(app: ReportingApp, seq: int, meter: RateMeter, now: float) -> dict[str, Any]:
    """The state message body, from ``app.info()`` (see docs/drivers.md)."""
    return state_from(app.info(), app.name, seq, meter, now)


def state_from(info: dict[str, Any], name: str, seq: int, meter: RateMeter,
               now: float) -> dict[str, Any]:
    """:func:`state_of`, from an ``info()`` already read."""
    pool = info.get("pool", {}) or {}
    finished = int(pool.get("done", 0) or 0) + int(pool.get("failed", 0) or 0)
    drivers = info.get("drivers", {}) or {}
    return {
        "app": info.get("name", name),
        "seq": seq,
        "time": time.time(),
        "state": info.get("state"),
        "slaves": len(pool.get("slaves", []) or []),
        "queue": pool.get("queue", 0),
        "running": pool.get("running", 0),
        "done": pool.get("done", 0),
        "errors": pool.get("failed", 0),
        "jobs_per_s": round(meter.update(now, finished), 3),
        "latency_ms": pool.get("latency_ms"),
        "limits": info.get("limits"),
        "pool": pool,
        "drivers": drivers,
        "ticks": sum(int(d.get("ticks", 0) or 0) for d in drivers.values()),
        "skipped": sum(int(d.get("skipped", 0) or 0) for d in drivers.values()),
        "faults": info.get("faults", {}),
        "restarts": info.get("restarts", {}),
    }


class MaintenanceChannel:
    """``await nursery.start(channel.run)`` binds and returns the address, then
    publishes the state every ``interval`` seconds until cancelled."""

    def __init__(self, app: ReportingApp, endpoint: str | None = None, *,
                 interval: float = INTERVAL) -> None:
        self.app = app
        self.requested = endpoint or DEFAULT_ENDPOINT
        self.interval = interval
        self.address: str | None = None
        self.published = 0
        self.dropped = 0
        self._sock: TrioSocket | None = None
        self._seq = 0
        self._meter = RateMeter()
        self._fault_seq = 0   # the last fault published (engine.faults: one sequence)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raw = pynng.Pub0()
        try:
            raw.listen(bind_endpoint(self.requested))    # (tcp://lo:9200: an interface)
        except (pynng.NNGException, TransportError) as exc:
            raw.close()
            raise DriverError(f"cannot listen on {self.requested}: {exc}") from None
        from transport.sockets import bound_address

        self.address = bound_address(raw)
        self._sock = TrioSocket(raw, buffer=256)
        try:
            task_status.started(self.address)
            while True:
                self.publish_state()
                await trio.sleep(self.interval)
        finally:
            self._sock.close()
            self._sock = None

    def publish_state(self) -> None:
        """The state, then the faults not published yet."""
        self._seq += 1
        info: dict[str, Any] | None = None
        try:
            info = self.app.info()
            body = state_from(info, self.app.name, self._seq, self._meter, trio.current_time())
        except Exception as exc:  # a broken info() must not stop the channel
            body = {"app": self.app.name, "seq": self._seq, "error": repr(exc)}
        self.publish(STATE_TOPIC, body)
        if info is not None:
            self._publish_faults(info)

    def publish_faults(self) -> None:
        """Publish the faults not published yet now (the app just recorded one),
        rather than with the next state."""
        try:
            info = self.app.info()
        except Exception:
            return  # the next state says so
        self._publish_faults(info)

    def _publish_faults(self, info: dict[str, Any]) -> None:
        for fault in info.get("recent_faults") or ():
            seq = fault.get("seq", 0) if isinstance(fault, dict) else 0
            if isinstance(seq, int) and seq > self._fault_seq:
                self._fault_seq = seq
                self.publish(FAULT_TOPIC, fault)

    def publish(self, topic: str, value: Any) -> None:
        """Non-blocking: queue one message for every subscriber (or count it dropped)."""
        if self._sock is None:
            self.dropped += 1
            return
        try:
            data = frame(topic, value)
        except CodecError:
            data = frame(topic, {"error": "value could not be encoded", "repr": repr(value)[:200]})
        try:
            self._sock.sock.send(data, block=False)
            self.published += 1
        except (pynng.TryAgain, pynng.Closed):
            self.dropped += 1
