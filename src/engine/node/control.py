"""The node's control endpoint: RpcServer requests mapped onto apps and node verbs.

``REQUEST [app, event, payload]`` submits a job to that app and answers with its
result, or streams its chunks.  ``REQUEST ["", verb, args]`` runs a node verb from
:data:`VERBS` (``list``, ``info``, ``deploy``, ``undeploy``, ``crashlog``).

Other modules add verbs with :func:`verb`::

    from engine.node.control import verb

    @verb("schedule")
    async def schedule(node, args):   # args: the request payload
        ...                           # return value (or transport.rpc.Stream) is the reply

and make sure their module is imported by the node (list it in :data:`VERB_MODULES`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from transport.errors import BadMessage, UnknownEvent
from transport.rpc import Deferred, Request, Stream

if TYPE_CHECKING:
    from engine.node.node import Node

VerbFn = Callable[["Node", Any], Awaitable[Any]]
VERBS: dict[str, VerbFn] = {}
# Modules that register more verbs when imported (e.g. a scheduler's "schedule").
VERB_MODULES: list[str] = ["engine.drivers.scheduler"]


def verb(name: str) -> Callable[[VerbFn], VerbFn]:
    def register(fn: VerbFn) -> VerbFn:
        VERBS[name] = fn
        return fn
    return register


def _load_verb_modules() -> None:
    for module in VERB_MODULES:
        importlib.import_module(module)


class ControlHandler:
    """The RpcServer handler of one node."""

    def __init__(self, node: "Node"):
        self.node = node
        _load_verb_modules()

    def __call__(self, req: Request) -> Any:
        """A verb's coroutine (the RpcServer runs it on a task), or an app job's
        :func:`reply_later` (answered from the pool, no task)."""
        if req.target == "":
            fn = VERBS.get(req.event)
            if fn is None:
                raise UnknownEvent(f"no node verb {req.event!r} (verbs: {', '.join(sorted(VERBS))})")
            return fn(self.node, req.payload)
        app = self.node.get(req.target)
        return reply_later(app.submit(req.event, req.payload, req.chunks))


def reply_later(job: Any) -> Deferred:
    """A job's reply as an RpcServer :class:`Deferred`: a single value or an error is
    answered from the job's reply callback, inside the pool's bookkeeping, so a
    request costs no task and no scheduler pass on its way back; a streamed reply
    goes to a worker task from its first chunk on (as :func:`answer` streams it).  A
    caller that gives up cancels the job."""
    # poll: the RpcServer may settle it by polling when it is all it waits for
    # (transport/spin.py); a job-like object without one is answered by its callback.
    deferred = Deferred(on_cancel=job.cancel, poll=getattr(job, "poll", None))

    def on_reply(job: Any) -> None:
        if job.streaming:
            deferred.stream(_relay(job, job.__aiter__()))
        elif job.error is not None:
            deferred.fail(job.error)
        else:
            deferred.resolve(job.result_nowait())

    job.add_reply_callback(on_reply)
    return deferred



async def answer(job: Any) -> Any:
    """A job's reply as the RpcServer wants it: the value of a single reply, or a
    :class:`Stream` of a streamed one (chunks forwarded as the slave sends them)."""
    chunks = job.__aiter__()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:          # a stream that ended without a chunk
        return Stream(_empty())
    except BaseException:
        _cancel(job)
        raise
    if not getattr(job, "streaming", False):   # known once the first reply arrived
        return first
    return Stream(_relay(job, chunks, first))


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover  (makes this an async generator)


async def _relay(job: Any, chunks: AsyncIterator[Any], *taken: Any) -> AsyncIterator[Any]:
    """A streamed job's chunks for the RpcServer (after the ones already ``taken`` from
    ``chunks``); however it ends, the job is cancelled if it is still running."""
    try:
        for chunk in taken:
            yield chunk
        async for chunk in chunks:
            yield chunk
    finally:
        _cancel(job)  # the caller left early (CANCEL, disconnect): free the slave's slot


def _cancel(job: Any) -> None:
    cancel = getattr(job, "cancel", None)
    if cancel is not None and not getattr(job, "done", False):
        try:
            cancel()
        except Exception:
            pass


# -- node verbs ------------------------------------------------------------------------

def _app_arg(args: Any) -> str:
    """Verbs about one app accept ``"name"`` or ``{"app": "name"}``."""
    if isinstance(args, str) and args:
        return args
    if isinstance(args, dict) and isinstance(args.get("app"), str) and args["app"]:
        return args["app"]
    raise BadMessage(f"expected an app name or {{\"app\": name}}, got {args!r:.100}")


def _drain_arg(args: Any) -> float | None:
    """``undeploy``'s optional ``"drain"``: seconds to let in-flight jobs finish."""
    drain = args.get("drain") if isinstance(args, dict) else None
    if drain is not None and (not isinstance(drain, (int, float)) or isinstance(drain, bool) or drain < 0):
        raise BadMessage(f"undeploy: drain must be a non-negative number of seconds, got {drain!r:.60}")
    return drain


@verb("list")
async def list_apps(node: "Node", args: Any) -> Any:
    return node.list()


@verb("info")
async def info(node: "Node", args: Any) -> Any:
    if args is None or args == {} or (isinstance(args, dict) and args.get("app") is None):
        return node.info()
    return node.get(_app_arg(args)).info()


@verb("crashlog")
async def crashlog(node: "Node", args: Any) -> Any:
    return node.get(_app_arg(args)).crashlog()


@verb("deploy")
async def deploy(node: "Node", args: Any) -> Any:
    """``{"path": "/abs/manifest.json"}`` or ``{"manifest": {...}, "base_dir": "/abs"}``,
    optionally with ``"name"``. ManifestError/DriverError reach the caller by type name."""
    if not isinstance(args, dict):
        raise BadMessage("deploy expects {\"path\": ...} or {\"manifest\": {...}, \"base_dir\": ...}")
    name = args.get("name")
    if name is not None and not isinstance(name, str):
        raise BadMessage(f"deploy: name must be a string, got {name!r:.60}")
    if isinstance(args.get("path"), str):
        app = await node.deploy(args["path"], name=name)
    elif "manifest" in args and isinstance(args.get("base_dir"), str):
        app = await node.deploy_data(args["manifest"], args["base_dir"], name=name)
    else:
        raise BadMessage("deploy expects {\"path\": ...} or {\"manifest\": {...}, \"base_dir\": ...}")
    return {"app": app.name, "manifest": str(app.manifest.source), "state": app.state}


@verb("undeploy")
async def undeploy(node: "Node", args: Any) -> Any:
    name = _app_arg(args)
    await node.undeploy(name, _drain_arg(args))
    return {"app": name, "state": "stopped"}
