"""One hosted app: a nursery holding its slave pool and its event drivers.

``await nursery.start(app.run)`` returns once the pool runs and every driver has
started (bound its port, armed its timer).  A driver that cannot start raises
:class:`DriverError` out of ``start`` and, because everything lives in the app's own
nursery, nothing of the app is left running.  ``await app.stop(timeout)`` stops the
drivers (no new events), drains the pool's in-flight jobs for up to ``timeout``
seconds, then cancels whatever is left.

Once started, an app stops only when asked (docs/architecture.md, "Faults").  Its
parts (the pool, the maintenance channel, each driver) each run in a task of their own,
:meth:`App._keep_running`, the part's boundary: a part that fails (raises, or a driver
that returns) is recorded (``info()["faults"]``, ``info()["restarts"]``, the
maintenance channel's ``fault`` topic) and a fresh one is started after a backoff
(:class:`engine.faults.Backoff`: 0.5 s doubling to 30 s, from 0.5 s again after a part
ran 30 s).  The pool itself keeps its slaves the same way.

A redeploy (:meth:`App.redeploy`: ``deploy`` of a running app's name, ``engine reload``)
swaps the app's code without a lost request: the new version's pool starts beside the
old one (a :class:`_PoolRun` each, in a cancel scope of its own) and must prove its
code runs (:meth:`Pool.warm_up`: a slave handshaked); then, in one step, new jobs go to
it, and the old pool drains what it holds and stops.  The app object stays, so drivers,
the maintenance channel and callers holding the app are untouched; drivers are
restarted only if the new manifest changes them.  A new version that cannot start
leaves the old one serving, and the caller gets :class:`RedeployFailed` saying why.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterable, Awaitable, Callable, Protocol

import trio

from engine.drivers import registry
from engine.drivers.base import Driver, HostingNode, sole_leaf
from engine import languages
from engine.errors import (AppBroken, DriverError, LanguageUnavailable, QueueFull, RedeployFailed,
                           ShuttingDown)
from engine.event_stats import EventStats
from engine.faults import KEEP, Backoff, FaultLog, describe
from engine.node.maintenance import MaintenanceChannel
from engine.manifest import AppManifest

if TYPE_CHECKING:
    from engine.pool.base import Pool
    from engine.pool.job import Job
    from engine.pool.zygote_client import Zygote

log = logging.getLogger(__name__)

# A part's ``run``: started with ``nursery.start``, runs until cancelled.
PartRun = Callable[..., Awaitable[Any]]


class AppHost(HostingNode, Protocol):
    """What an app and its drivers need of the node hosting it
    (:class:`engine.node.node.Node`): its cluster (drivers), its zygote (the pool)."""

    @property
    def zygote(self) -> Zygote | None:
        """Forks the slaves of every app of the node (None: each pool starts its own)."""


def _default_pool_factory(manifest: AppManifest) -> Pool:
    """The manifest's pool; LanguageUnavailable if its language cannot run here (say
    why at deploy, before anything starts, rather than as slaves that fail to start)."""
    missing = languages.get(manifest.type).missing()
    if missing:
        raise LanguageUnavailable(str(manifest.source), manifest.type, missing)
    # Imported late: the pools pull in subprocess and threading machinery.
    if manifest.engine.backend == "thread":
        from engine.pool.threads import ThreadPool

        return ThreadPool(manifest.name, manifest.entry, manifest.engine)
    from engine.pool.process import SlavePool

    return SlavePool(manifest.name, manifest.entry, manifest.engine, language=manifest.type,
                     args=manifest.args, base_dir=manifest.base_dir)


class _PoolRun:
    """One version's pool as its app runs it: the manifest it was made from, the pool
    (a fresh one after a failure), and the scope that stops this version alone."""

    def __init__(self, manifest: AppManifest, pool: Pool) -> None:
        self.manifest = manifest
        self.pool = pool
        self.scope = trio.CancelScope()


class App:
    def __init__(self, manifest: AppManifest, *,
                 pool_factory: Callable[[AppManifest], Pool] = _default_pool_factory) -> None:
        self.manifest = manifest
        self.name = manifest.name
        # The Node hosting it, set by the node before run() (drivers reach its cluster).
        self.node: AppHost | None = None
        self._pool_factory = pool_factory
        self._serving = _PoolRun(manifest, pool_factory(manifest))  # the pool new jobs go to
        self._redeploying = False
        self.redeploys = 0              # versions deployed over the first one
        self.drivers: dict[str, Driver[Any]] = {}
        pubsub = manifest.pubsub.endpoint if manifest.pubsub else None
        self.maintenance = MaintenanceChannel(self, pubsub)
        self.state = "created"          # created -> starting -> running -> stopping -> stopped
        self.faults = FaultLog()        # failures of its parts but the pool's slaves (the pool's)
        self.restarts: dict[str, int] = {}  # part -> times started again after a failure
        self.events = EventStats()      # per event: accepted, refused, outcomes, latency
        self.started_at: float | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._drivers_scope: trio.CancelScope | None = None
        self._drivers_ended = trio.Event()
        self._stopped = trio.Event()
        self.stop_asked = trio.Event()  # stop() was called: whatever ends it now was asked for

    # -- lifetime -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the app until cancelled or :meth:`stop`-ped."""
        if self.state != "created":
            raise RuntimeError(f"app {self.name} was already run")
        self.state = "starting"
        failure: DriverError | None = None
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._run_pool, self._serving)
                    # Drivers get their own scope so stop() can silence them before draining.
                    try:
                        # The maintenance channel first: sinks publish results on it.
                        try:
                            await nursery.start(self._keep_running, "maintenance", "maintenance",
                                                lambda first: self.maintenance.run)
                        except DriverError as exc:
                            raise DriverError(f"app {self.name} ({self.manifest.source}): "
                                              f"pubsub.endpoint: {exc}") from None
                        await nursery.start(self._run_drivers)
                    except DriverError as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                    else:
                        self.state = "running"
                        self.started_at = time.time()
                        task_status.started(self)
            # Raised outside the nursery so the caller gets the DriverError itself,
            # not an ExceptionGroup, and only after the pool is fully torn down.
            if failure is not None:
                raise failure
        finally:
            self.state = "stopped"
            self._stopped.set()

    @property
    def pool(self) -> Pool:
        """The pool new jobs go to (the newest version's, once it has started)."""
        return self._serving.pool

    async def _run_pool(self, run: _PoolRun, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one version's pool running until its scope is cancelled."""
        with run.scope:
            await self._keep_running("pool", "pool", partial(self._fresh_pool, run),
                                     task_status=task_status)

    def _fresh_pool(self, run: _PoolRun, first: bool) -> PartRun:
        """The pool to run: the one made with the version, then a new one after a
        failure (the old one answered its jobs with ShuttingDown as it stopped)."""
        if not first:
            run.pool = self._pool_factory(run.manifest)
        zygote = self.node.zygote if self.node is not None else None
        if zygote is not None:
            run.pool.use_zygote(zygote)  # one per node, not one per app
        return run.pool.run

    def _fresh_driver(self, cls: type[Driver[Any]], spec: Any, first: bool) -> PartRun:
        """A new driver for ``spec``; after a failure it carries on its predecessor's
        counters."""
        driver = cls(spec)
        before = self.drivers.get(spec.name)
        if before is not None:
            driver.stats = before.stats
        self.drivers[spec.name] = driver
        return partial(driver.run, self)

    async def _keep_running(self, part: str, kind: str, fresh: Callable[[bool], PartRun], *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one part until cancelled: ``fresh(first)`` makes it and returns its
        ``run``.  A failure before its first start is the app's (raised: the app does
        not start); any later failure of the part, or its ``run`` returning, is the
        part's: recorded as ``{kind}-crash`` (failed while running), ``{kind}-start`` (a
        fresh one could not start) or ``{kind}-ended`` (returned), and a fresh one
        started after a backoff.  Cancellation (the app stopping) is never caught here:
        ``except*`` handles the failures in a group and raises its ``Cancelled`` on."""
        backoff = Backoff()
        status: trio.TaskStatus[None] | None = task_status
        while True:
            started_at: float | None = None
            failure: BaseException | None = None
            try:
                run = fresh(status is not None)
                async with trio.open_nursery() as nursery:
                    await nursery.start(run)
                    started_at = trio.current_time()
                    if status is not None:
                        status.started()
                        status = None
            except* Exception as group:
                failure = group
            if status is not None:  # it never started: the app's start fails
                assert failure is not None, "a part that returned without starting raised"
                raise sole_leaf(failure)
            ran_for = None if started_at is None else trio.current_time() - started_at
            if failure is None:
                why, what = "ended", f"{kind}-ended"
            else:
                why = describe(failure)
                what = f"{kind}-crash" if started_at is not None else f"{kind}-start"
                log.error("app %s: %s failed", self.name, part, exc_info=failure)
            delay = backoff.failed(ran_for)
            self.restarts[part] = self.restarts.get(part, 0) + 1
            self.faults.record(part, what, f"{why}; starting again in {delay:g}s")
            log.warning("app %s: %s %s; starting it again in %gs", self.name, part,
                        "ended" if failure is None else "failed", delay)
            self.maintenance.publish_faults()
            await trio.sleep(delay)

    async def _run_drivers(self, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The manifest's drivers, until cancelled (``_drivers_ended`` is set once they
        have all stopped: a redeploy's new drivers may then bind the same ports)."""
        self._drivers_ended = ended = trio.Event()
        try:
            await self._start_drivers(task_status)
        finally:
            ended.set()

    async def _start_drivers(self, task_status: trio.TaskStatus[None]) -> None:
        failure: DriverError | None = None
        with trio.CancelScope() as self._drivers_scope:
            async with trio.open_nursery() as nursery:
                for spec in self.manifest.drivers:
                    cls = registry.get(spec.type)
                    where = (f"app {self.name} ({self.manifest.source}): "
                             f"{spec.path or 'drivers.' + spec.name} ({spec.type})")
                    if cls is None:
                        failure = DriverError(f"{where}: no such driver type installed")
                        break
                    try:
                        await nursery.start(self._keep_running, f"driver {spec.name}", "driver",
                                            partial(self._fresh_driver, cls, spec))
                    except DriverError as exc:
                        failure = DriverError(f"{where} could not start: {exc}")
                        break
                    except Exception as exc:  # a driver bug is still this app's start failure
                        failure = DriverError(f"{where} failed while starting: "
                                              f"{type(exc).__name__}: {exc}")
                        break
                if failure is not None:
                    nursery.cancel_scope.cancel()
                else:
                    task_status.started()
        if failure is not None:
            raise failure

    async def stop(self, timeout: float | None = None) -> None:
        """Stop drivers, drain in-flight jobs for up to ``timeout`` seconds
        (default: the manifest's termination-timeout), then cancel everything."""
        if timeout is None:
            timeout = self.manifest.engine.termination_timeout
        self.stop_asked.set()
        if self.state in ("stopped", "created"):
            self.state = "stopped"
            self._stopped.set()
            return
        if self.state != "stopping":
            self.state = "stopping"
            await self._drain_drivers(timeout)
            if self._drivers_scope is not None:
                self._drivers_scope.cancel()
            # drain() is bounded by its own timeout; the extra margin covers a drain
            # that misbehaves, so stop() itself can never hang the node's shutdown.
            with trio.move_on_after(timeout + 5):
                try:
                    await self.pool.drain(timeout)
                except Exception:
                    pass  # draining is best effort; cancellation below is not
            if self._scope is not None:
                self._scope.cancel()
        await self._stopped.wait()

    async def _drain_drivers(self, timeout: float) -> None:
        """Each driver's goodbye (Driver.drain), side by side, bounded by ``timeout``;
        a driver whose drain fails is only cancelled a moment earlier."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for driver in list(self.drivers.values()):
                    nursery.start_soon(self._drain_one, driver, timeout)

    async def _drain_one(self, driver: Driver[Any], timeout: float) -> None:
        try:
            await driver.drain(timeout)
        except Exception:
            log.exception("app %s: draining driver %s failed", self.name, driver.spec.name)

    async def redeploy(self, manifest: AppManifest) -> None:
        """Switch the app to ``manifest``'s version without losing a request (module
        docstring).  Returns once the new version serves and the old one has drained
        (for up to the old version's termination-timeout: what is still running then
        fails with ShuttingDown).  RedeployFailed, with the old version serving on, if
        the new one cannot start (its code does not import, a driver cannot bind)."""
        nursery = self._nursery
        if self.state != "running" or nursery is None:
            raise ShuttingDown(f"app {self.name} is {self.state}; cannot redeploy it")
        if self._redeploying:
            raise RedeployFailed(f"app {self.name}: a redeploy is already under way")
        self._redeploying = True
        try:
            old = self._serving
            new = _PoolRun(manifest, self._pool_factory(manifest))
            try:
                # bounded: a slave that never handshakes is killed at its startup-timeout
                with trio.fail_after(manifest.engine.startup_timeout + 10):
                    await nursery.start(self._run_pool, new)
                    await new.pool.warm_up()
            except (Exception, trio.TooSlowError) as exc:
                new.scope.cancel()
                raise RedeployFailed(f"app {self.name}: the version in {manifest.source} did "
                                     f"not start ({describe(exc)}); the running version "
                                     f"keeps serving") from None
            if manifest.drivers != old.manifest.drivers:
                await self._switch_drivers(nursery, old, new)
            self._serving = new              # from here on, new jobs go to the new version
            self.manifest = manifest
            self.redeploys += 1
            log.info("app %s: now serving the version in %s; draining the previous one",
                     self.name, manifest.source)
            timeout = old.manifest.engine.termination_timeout
            with trio.move_on_after(timeout + 5):
                try:
                    await old.pool.drain(timeout)
                except Exception:
                    pass  # best effort, as in stop(); its scope ends the rest
            old.scope.cancel()
        finally:
            self._redeploying = False

    async def _switch_drivers(self, nursery: trio.Nursery, old: _PoolRun, new: _PoolRun) -> None:
        """The new manifest's drivers instead of the old one's (a driver that listens
        must let go of its port first: a short gap for that driver's clients).  If they
        cannot start, the old drivers come back and the new version is abandoned."""
        await self._drain_drivers(old.manifest.engine.termination_timeout)
        if self._drivers_scope is not None:
            self._drivers_scope.cancel()
        await self._drivers_ended.wait()
        self.manifest = new.manifest
        try:
            await nursery.start(self._run_drivers)
        except DriverError as exc:
            self.manifest = old.manifest
            new.scope.cancel()
            await nursery.start(self._run_drivers)
            raise RedeployFailed(f"app {self.name}: the version in {new.manifest.source} did "
                                 f"not start ({exc}); the running version keeps serving") from None

    # -- use --------------------------------------------------------------------------
    def submit(self, event: str, payload: Any, chunks: AsyncIterable[Any] | None = None) -> Job:
        """Queue a job (see SlavePool.submit); raises QueueFull / ShuttingDown / AppBroken
        at once.  ``chunks``: a chunked request's chunks, for the handler to read.
        Each job is counted by event (:attr:`events`), refusals too."""
        if self.state != "running":
            self.events.refused(event, ShuttingDown.code)
            raise ShuttingDown(f"app {self.name} is {self.state}")
        try:
            if chunks is None:
                job = self.pool.submit(event, payload)
            else:
                job = self.pool.submit(event, payload, chunks)
        except (QueueFull, ShuttingDown, AppBroken) as exc:
            self.events.refused(event, exc.code)
            raise
        self.events.accepted(event, job)
        return job

    def publish(self, topic: str, value: Any) -> None:
        """Publish on the app's maintenance channel (sinks' results, for example)."""
        self.maintenance.publish(topic, value)

    def crashlog(self) -> list[str]:
        return list(self.pool.crashlog())

    def info(self) -> dict[str, Any]:
        drivers = {}
        for spec in self.manifest.drivers:
            entry: dict[str, Any] = {"type": spec.type, "emit": spec.emit}
            driver = self.drivers.get(spec.name)
            if driver is not None:
                try:
                    entry.update(driver.info())
                except Exception as exc:  # info must not take the control verb down
                    entry["error"] = f"{type(exc).__name__}: {exc}"
            restarts = self.restarts.get(f"driver {spec.name}", 0)
            if restarts:  # a driver that never failed shows only its own fields
                entry["restarts"] = restarts
            drivers[spec.name] = entry
        pool = self.pool.info()
        faults = dict(pool.get("faults") or {})
        for kind, count in self.faults.counts.items():
            faults[kind] = faults.get(kind, 0) + count
        recent = sorted([*(pool.get("recent_faults") or ()), *self.faults.recent()],
                        key=lambda f: f["seq"])[-KEEP:]
        return {
            "name": self.name,
            "state": self.state,
            "manifest": str(self.manifest.source),
            "language": self.manifest.type,
            "entry": str(self.manifest.entry),
            "uptime": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            "limits": {"pool-limit": self.manifest.engine.pool_limit,
                       "queue-limit": self.manifest.engine.queue_limit,
                       "concurrency": self.manifest.engine.concurrency},
            "pool": pool,
            "drivers": drivers,
            "pubsub": self.maintenance.address,
            "faults": faults,
            "recent_faults": recent,
            "restarts": dict(self.restarts),
            "redeploys": self.redeploys,
            "events": self.events.to_dict(),
        }

