"""Headless Chromium for the tests of pages (the node's dashboard, the mesh monitor's
graph): one command run to its end, Chromium and every helper it starts ended in any case."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest
import trio

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
         "--hide-scrollbars"]


def chromium_or_skip(what: str) -> str:
    """Chromium's path, or the test is skipped saying what it would have tested."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(f"no chromium on PATH: apt-get install -y chromium (Debian) to run the "
                    f"{what} browser test (.ci/run does)")
    return path


async def chromium(binary: str, tmp_path: Path, name: str, *args: str, timeout: float = 40) -> bytes:
    """Run one headless Chromium command to its end and return its stdout; Chromium and
    every helper it started are ended in any case."""
    profile = tmp_path / f"profile-{name}"
    profile.mkdir()
    log = tmp_path / f"chromium-{name}.log"
    with open(log, "wb") as err, open(tmp_path / f"chromium-{name}.out", "wb+") as out:
        proc = await trio.lowlevel.open_process(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=out, stderr=err, start_new_session=True)
        try:
            with trio.fail_after(timeout):
                await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)   # its helpers, and itself if still there
                await proc.wait()
        out.seek(0)
        output = out.read()
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{log.read_text()[-2000:]}"
    return output
