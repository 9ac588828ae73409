"""Interface names as the host of a bind endpoint (transport/bind_hosts.py): ZeroMQ's
``tcp://lo:9100``, which the seed's manifests use (#17)."""
from __future__ import annotations

import socket

import pytest

from transport import bind_hosts
from transport.bind_hosts import UnknownInterface, bind_endpoint, bind_host

from engine.manifest import without_trailing_commas


def test_an_interface_name_is_its_ipv4_address_and_the_rest_is_left_alone():
    assert bind_host("lo") == "127.0.0.1"
    for host in ("127.0.0.1", "0.0.0.0", "", "*", "::1", "[::1]", "localhost"):
        assert bind_host(host) == host
    assert bind_endpoint("tcp://lo:9100") == "tcp://127.0.0.1:9100"
    assert bind_endpoint("tls+tcp://lo:9100") == "tls+tcp://127.0.0.1:9100"
    assert bind_endpoint("ws://lo:8080/path") == "ws://127.0.0.1:8080/path"
    for address in ("tcp://127.0.0.1:9100", "ipc:///tmp/x.sock", "tcp://:9100", "inproc://lo"):
        assert bind_endpoint(address) == address


def test_a_name_that_is_no_interface_nor_host_says_which_interfaces_there_are(monkeypatch):
    def no_such_host(*args, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(bind_hosts.socket, "getaddrinfo", no_such_host)
    with pytest.raises(UnknownInterface, match=r"no interface or host named 'eht0' \(this "
                                               r"machine's interfaces: .*\blo\b"):
        bind_endpoint("tcp://eht0:9100")


def test_an_interface_without_ipv4_is_refused_by_name(monkeypatch):
    class Addr:
        family, address = socket.AF_INET6, "fe80::1"

    monkeypatch.setattr(bind_hosts.psutil, "net_if_addrs", lambda: {"v6only": [Addr()]})
    with pytest.raises(UnknownInterface, match="interface 'v6only' has no IPv4 address"):
        bind_host("v6only")


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1,}', {"a": 1}),
    ('{"a": [1, 2 ,\n ],\n}', {"a": [1, 2]}),
    ('{"a": ",}", "b": "\\\\",}', {"a": ",}", "b": "\\"}),      # commas inside strings stay
    ('{"a": "\\",}",}', {"a": '",}'}),                           # an escaped quote too
])
def test_trailing_commas_are_dropped_and_nothing_else(text, expected):
    import json

    assert json.loads(without_trailing_commas(text)) == expected


def test_a_manifest_that_is_still_not_json_is_refused_naming_the_first_error(tmp_path):
    from engine.errors import ManifestError
    from engine.manifest import load_manifest

    (tmp_path / "manifest.json").write_text('{"type": "python",, "args": "app.py"}')
    with pytest.raises(ManifestError, match="expected valid JSON.*line 1 column 19"):
        load_manifest(tmp_path)
