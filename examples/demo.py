"""``make demo``: the engine on the bundled example apps, and beside it Sockend with the
example's mesh services, so both pages of ``examples/sockend/`` can be opened.

    python examples/demo.py            # SOCKEND_PORT=80 (as root) for the seed's page

Ctrl-C stops everything: each child is terminated, then killed if it lingers, and reaped.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def supervise(argv: list[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    proc = await trio.lowlevel.open_process(argv, cwd=ROOT)
    task_status.started()
    try:
        await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


async def main() -> None:
    port = os.environ.get("SOCKEND_PORT", "5555")
    py = sys.executable
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, [py, "-m", "engine", "run", "examples/"])
            await nursery.start(supervise, [py, "examples/sockend/services.py"])
            await nursery.start(supervise, [py, "-m", "sockend", "--port", port, "--static",
                                            "examples/sockend"])
            await trio.sleep(1.5)
            seed = "" if port == "80" else (
                "\n  (it connects to http://localhost, port 80: `sudo make demo SOCKEND_PORT=80`)")
            print(f"\nSockend: http://localhost:{port}/ (Sockend's own client), "
                  f"http://localhost:{port}/socketio.html (socket.io) and "
                  f"http://localhost:{port}/seed.html (cote's README page){seed}\n", flush=True)
            async for _ in signals:     # Ctrl-C: every child is ended by its supervisor
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main)
