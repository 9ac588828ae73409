"""A real etcd for the tests: /usr/bin/etcd on free loopback ports and a tmp data dir.

``etcd_server`` yields its client address ``"127.0.0.1:PORT"``; ``etcd_instance`` yields
the :class:`EtcdProcess` itself, for tests that stop etcd and start it again (same ports,
same data: what a node sees when its etcd restarts).  Either way the process is
terminated and reaped when the test ends (killed if it does not stop within seconds).
Tests using them start a process: they carry ``@pytest.mark.e2e``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from support import free_tcp_port

ETCD = os.environ.get("ENGINE_TEST_ETCD", "/usr/bin/etcd")
START_TIMEOUT = 20.0


class EtcdProcess:
    """One single-member etcd; :meth:`start` and :meth:`stop` may be called again."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.client_port = free_tcp_port()
        self.peer_port = free_tcp_port()
        self.address = f"127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / "etcd.log"

    def start(self) -> None:
        assert self.proc is None, "etcd already running"
        client = f"http://{self.address}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "test", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"etcd exited with {code} at start: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                    if b'"true"' in answer.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd not healthy within {START_TIMEOUT:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate (kill after 5 s) and reap."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@pytest.fixture
def etcd_instance(tmp_path: Path) -> Iterator[EtcdProcess]:
    if not os.access(ETCD, os.X_OK) and shutil.which(ETCD) is None:
        pytest.skip(f"etcd is not installed at {ETCD} (apt-get install etcd-server, or "
                    f"set ENGINE_TEST_ETCD): the etcd registry tests need a real etcd")
    etcd = EtcdProcess(tmp_path / "etcd-data")
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
def etcd_server(etcd_instance: EtcdProcess) -> str:
    """The address ``"127.0.0.1:PORT"`` of a running etcd, stopped after the test."""
    return etcd_instance.address
