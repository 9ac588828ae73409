"""The e2e rule of tests/conftest.py: what a test not marked e2e may not do, what it
may, and that an e2e test's leftover processes are found and killed.

These tests are marked e2e themselves so that the conftest guard stays out of the way:
they apply the guard (``processes_and_sockets_forbidden``) to a block of their own."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pynng
import pytest
import trio

from support import E2EOnly, descendant_pids, end_leftover_processes, processes_and_sockets_forbidden

pytestmark = pytest.mark.e2e


def udp_bind():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))


def udp_sendto():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 9))


def tcp_connect():
    with socket.socket() as s:
        s.connect(("127.0.0.1", 1))


def unix_bind(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s.sock"))


def nng_listen_tcp():
    with pynng.Pair1(listen="tcp://127.0.0.1:0"):
        pass


def nng_dial_ipc(tmp_path):
    with pynng.Pair1(dial=f"ipc://{tmp_path}/nobody.sock", block_on_dial=False):
        pass


def run_a_process():
    subprocess.run(["true"], check=True)


def fork():
    os.fork()


@pytest.mark.parametrize("attempt", [udp_bind, udp_sendto, tcp_connect, unix_bind, nng_listen_tcp,
                                     nng_dial_ipc, run_a_process, fork])
def test_starting_a_process_or_addressing_a_socket_is_refused(attempt, tmp_path):
    args = (tmp_path,) if attempt in (unix_bind, nng_dial_ipc) else ()
    with processes_and_sockets_forbidden("probe") as violations:
        with pytest.raises(E2EOnly, match="needs @pytest.mark.e2e"):
            attempt(*args)
    assert len(violations) == 1


def test_everything_is_restored_after_the_block():
    with processes_and_sockets_forbidden("probe"):
        pass
    udp_bind()
    nng_listen_tcp()
    run_a_process()


async def test_trio_processes_and_sockets_are_refused_too():
    with processes_and_sockets_forbidden("probe") as violations:
        with pytest.raises(E2EOnly):
            await trio.run_process(["true"])
        with pytest.raises(BaseExceptionGroup) as raised:   # happy eyeballs: a group
            await trio.open_tcp_stream("127.0.0.1", 1)
        assert raised.group_contains(E2EOnly)
        with pytest.raises(E2EOnly):
            await trio.serve_tcp(lambda stream: None, 0, host="127.0.0.1")
    assert len(violations) == 3


def test_a_refusal_swallowed_by_the_code_under_test_is_still_recorded():
    with processes_and_sockets_forbidden("probe") as violations:
        try:
            run_a_process()
        except Exception:
            pass
    assert violations and "started a process" in violations[0]


def test_the_standard_librarys_platform_probes_stay_allowed():
    # what croniter and trio run when first imported, lazily, inside some test
    import ctypes.util
    import platform

    with processes_and_sockets_forbidden("probe") as violations:
        platform.architecture()
        ctypes.util.find_library("pthread")
    assert violations == []


async def test_in_process_pairs_stay_allowed():
    with processes_and_sockets_forbidden("probe") as violations:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"ping")
            assert b.recv(4) == b"ping"
        with pynng.Pair1(listen="inproc://e2e-rule") as server, \
                pynng.Pair1(dial="inproc://e2e-rule") as client:
            client.send(b"hi")
            assert server.recv() == b"hi"
        send, receive = trio.open_memory_channel(1)
        await send.send(1)
        assert await receive.receive() == 1
    assert violations == []


def test_a_process_left_running_is_killed_and_reported():
    before = descendant_pids()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        left = end_leftover_processes(before, grace=0.2)
        assert len(left) == 1 and left[0].startswith(f"{proc.pid} sleep 60")
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_process_that_ended_is_not_reported():
    before = descendant_pids()
    subprocess.run(["true"], check=True)
    unwaited = subprocess.Popen(["true"])   # a zombie until reaped: it has ended all the same
    try:
        assert end_leftover_processes(before, grace=5) == []
    finally:
        unwaited.wait()
