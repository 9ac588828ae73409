"""Interface names as the host of an endpoint this process binds: ``tcp://lo:9100``.

ZeroMQ reads the host of a bind endpoint as an interface name first, and Cocaine's
manifests were written for it (the seed's own example binds ``tcp://lo:9200``); nng and
the OS know only addresses and host names.  :func:`bind_host` turns an interface name
into the interface's IPv4 address at bind time (addresses can change between runs), and
says which interfaces there are when a name is neither an interface nor a host.
"""
from __future__ import annotations

import ipaddress
import socket

import psutil

from transport.errors import TransportError

_WILDCARDS = ("", "*")
# Schemes whose address is HOST:PORT (what may carry an interface name).
_HOST_PORT_SCHEMES = ("tcp", "nng+tcp", "tls+tcp", "ws", "wss")


class UnknownInterface(TransportError):
    """A bind endpoint's host is no interface, address or host name of this machine."""


def bind_host(host: str) -> str:
    """``host`` to bind: an interface's name -> its first IPv4 address; an address, a
    wildcard or a host name the resolver knows -> unchanged."""
    if host in _WILDCARDS or _is_ip(host):
        return host
    interfaces = psutil.net_if_addrs()
    if host in interfaces:
        v4 = [a.address for a in interfaces[host] if a.family == socket.AF_INET]
        if not v4:
            raise UnknownInterface(f"interface {host!r} has no IPv4 address to bind")
        return v4[0]
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
    except (socket.gaierror, UnicodeError):
        names = ", ".join(sorted(interfaces)) or "none"
        raise UnknownInterface(f"no interface or host named {host!r} "
                               f"(this machine's interfaces: {names})") from None
    return host


def bind_endpoint(address: str) -> str:
    """``address`` with an interface name for host replaced by the interface's address
    (``tcp://lo:9100`` -> ``tcp://127.0.0.1:9100``); other addresses unchanged."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in _HOST_PORT_SCHEMES:
        return address
    hostport, slash, path = rest.partition("/")
    host, colon, port = hostport.rpartition(":")
    if not colon or host.startswith("["):
        return address
    resolved = bind_host(host)
    if resolved == host:
        return address
    return f"{scheme}://{resolved}:{port}{slash}{path}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
