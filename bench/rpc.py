"""Our transport alone: ``transport.rpc`` RpcClient (this process) -> RpcServer echo
(a child process), over tcp on loopback.  Also samples the server's RSS after
warm-up and after the run, for the leak check."""
from __future__ import annotations

from .harness import PAYLOAD, RRFigures, Settings, child_process, measure_rr, python_child


def available() -> str | None:
    """None if the code exists, else why the column is skipped."""
    try:
        from transport.rpc import RpcClient, RpcServer  # noqa: F401
    except ImportError as exc:
        return f"skipped: transport.rpc not importable ({exc})"
    return None


async def rpc_echo(settings: Settings) -> tuple[RRFigures, dict[str, float]]:
    from transport.rpc import RpcClient

    async with child_process(python_child("bench.servers", "rpc-echo",
                                          "tcp://127.0.0.1:0")) as server:
        memory: dict[str, float] = {}
        async with RpcClient(server.ready, timeout=10) as client:
            await client.wait_connected()

            async def call():
                await client.call("echo", "echo", PAYLOAD)

            figures = await measure_rr(
                lambda: call, settings,
                after_warmup=lambda: memory.__setitem__("server_after_warmup", server.rss_mb()))
        memory["server_after_run"] = server.rss_mb()
    return figures, memory
