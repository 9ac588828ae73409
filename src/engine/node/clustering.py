"""What a node needs of the cluster it was started in (:mod:`engine.cluster`).

The code that starts a node decides whether it joins a cluster (``python -m engine
run --cluster NAME``: :mod:`engine.cli.commands`), by giving the node a factory of a
:class:`NodeCluster`; the node never imports the cluster.  From it, the node gets the
verbs the cluster adds or wraps (``nodes``, ``cluster.*``, and ``deploy``/``undeploy``
that reach every peer), routes app requests through :meth:`NodeCluster.serve`, and runs
it beside the apps once its control endpoint listens.
"""
from __future__ import annotations

from typing import Any, Protocol

import trio

from engine.node.verbs import Verbs


class NodeCluster(Protocol):
    """A node's part in a cluster (:class:`engine.cluster.verbs.ClusterMember`)."""

    @property
    def has_peers(self) -> bool:
        """Whether app requests may go elsewhere (server drivers ask, per request)."""
        ...

    @property
    def peer_secret(self) -> bytes | None:
        """The secret its peers seal their requests to this node's control endpoint
        with (the cluster's: its holders may push apps to the node already), which the
        node accepts beside its own token; None: peers use the node's token, found on
        this host (docs/security.md)."""
        ...

    def verbs(self, plain: Verbs) -> Verbs:
        """The verbs this adds to the node, or replaces (``plain``: the node's own,
        for the ones it wraps)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The cluster as this node sees it, as the ``nodes`` verb shows it (its nodes,
        their apps and load: :mod:`engine.cluster.view`); the node's metrics and
        dashboard read it too."""
        ...

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        """Run an app request here or on a peer; the answer as a handler returns it."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Take part in the cluster until cancelled; ``started()`` once it does.  Raising
        before that stops the node from starting (the node raises it)."""
        ...
