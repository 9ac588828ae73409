"""The node's control endpoint: RpcServer requests mapped onto apps and node verbs.

``REQUEST [app, event, payload]`` submits a job to that app and answers with its
result, or streams its chunks.  ``REQUEST ["", verb, args]`` runs a verb from the
node's own table (:mod:`engine.node.verbs`; a node in a cluster has the cluster's
too), given to the handler by the node that made it.

Only a request that came sealed with the node's token (``Request.sealed``: the
RpcServer's gate verified it, transport/seal.py) runs anything; without the token a
caller gets answers to ``open_verbs`` (read-only; the node passes
:data:`engine.node.auth.OPEN_VERBS` on loopback, nothing otherwise) and ``Unauthorized``
for the rest (docs/security.md).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from transport.errors import UnknownEvent
from transport.rpc import Deferred, Request, Stream

from engine.node.auth import refusal

if TYPE_CHECKING:
    from engine.node.clustering import NodeCluster
    from engine.node.verbs import NodeApi, Verbs
    from engine.pool.base import JobHandle

log = logging.getLogger(__name__)


class ControlHandler:
    """The RpcServer handler of one node: ``verbs`` is that node's table;
    ``open_verbs`` the verbs answered without the token; ``address``: the control
    address, for the refusals' messages."""

    def __init__(self, node: NodeApi, verbs: Verbs, *,
                 open_verbs: frozenset[str] = frozenset(), address: str | None = None):
        self.node = node
        self.verbs = verbs
        self.open_verbs = open_verbs
        self.address = address

    def __call__(self, req: Request) -> Any:
        """A verb's coroutine (the RpcServer runs it on a task), or an app job's
        :func:`reply_later` (answered from the pool, no task)."""
        if not req.sealed:
            self.check_open(req)
        if req.target == "":
            fn = self.verbs.get(req.event)
            if fn is None:
                raise UnknownEvent(f"no node verb {req.event!r} (verbs: {', '.join(sorted(self.verbs))})")
            return fn(self.node, req.payload)
        app = self.node.get(req.target)
        return reply_later(app.submit(req.event, req.payload, req.chunks))

    def check_open(self, req: Request) -> None:
        """Raise ``Unauthorized`` unless ``req`` (which came without the token) asks
        for one of the open verbs."""
        if req.target != "" or req.event not in self.open_verbs:
            raise refusal(req.target, req.event, self.address, self.open_verbs)


class ClusterControlHandler(ControlHandler):
    """The control handler of a node in a cluster: app requests go through
    :meth:`NodeCluster.serve` (here, or on a less loaded peer); node verbs as usual."""

    def __init__(self, node: NodeApi, verbs: Verbs, cluster: NodeCluster, *,
                 open_verbs: frozenset[str] = frozenset(), address: str | None = None):
        super().__init__(node, verbs, open_verbs=open_verbs, address=address)
        self.cluster = cluster

    def __call__(self, req: Request) -> Any:
        if req.target == "" or req.chunks is not None:
            return super().__call__(req)  # a chunked request runs where its chunks arrive
        if not req.sealed:
            self.check_open(req)
        return self.cluster.serve(req.target, req.event, req.payload)  # a coroutine: on a task


def reply_later(job: JobHandle) -> Deferred:
    """A job's reply as an RpcServer :class:`Deferred`: a single value or an error is
    answered from the job's reply callback, inside the pool's bookkeeping, so a
    request costs no task and no scheduler pass on its way back; a streamed reply
    goes to a worker task from its first chunk on (as :func:`answer` streams it).  A
    caller that gives up cancels the job."""
    # poll: the RpcServer may settle it by polling when it is all it waits for
    # (transport/_spin.py); otherwise the reply callback answers it.
    deferred = Deferred(on_cancel=job.cancel, poll=job.poll)

    def on_reply(job: JobHandle) -> None:
        if job.streaming:
            deferred.stream(_relay(job, job.__aiter__()))
        elif job.error is not None:
            deferred.fail(job.error)
        else:
            deferred.resolve(job.result_nowait())

    job.add_reply_callback(on_reply)
    return deferred


async def answer(job: JobHandle) -> Any:
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
    if not job.streaming:   # known once the first reply arrived
        return first
    return Stream(_relay(job, chunks, first))


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover  (makes this an async generator)


async def _relay(job: JobHandle, chunks: AsyncIterator[Any], *taken: Any) -> AsyncIterator[Any]:
    """A streamed job's chunks for the RpcServer (after the ones already ``taken`` from
    ``chunks``); however it ends, the job is cancelled if it is still running."""
    try:
        for chunk in taken:
            yield chunk
        async for chunk in chunks:
            yield chunk
    finally:
        _cancel(job)  # the caller left early (CANCEL, disconnect): free the slave's slot


def _cancel(job: JobHandle) -> None:
    """Free the job's slot while unwinding: logged, not raised, if that fails, so the
    reason the caller left (a CANCEL, an error) is the one that propagates."""
    if not job.done:
        try:
            job.cancel()
        except Exception:
            log.exception("cancelling %r after its caller left failed", job)
