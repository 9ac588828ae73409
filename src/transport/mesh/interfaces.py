"""Which interface to beacon on, read off an endpoint the node binds anyway.

A node whose control endpoint is ``tcp://10.0.0.4:5000`` has said which interface it
serves on; beaconing on the default (``0.0.0.0``: whatever the routing table picks for
the multicast group) can pick another, or none, and the node then runs alone.
:func:`interface_for_endpoint` is the pure half of deriving one from the other; the
caller keeps its configured default when it answers None.
"""
from __future__ import annotations

import ipaddress

# Schemes whose address is host:port over IPv4/TCP (what discovery's IPv4 beacons can follow).
_HOST_PORT_SCHEMES = ("tcp", "tls+tcp", "nng+tcp")


def interface_for_endpoint(endpoint: str) -> str | None:
    """The IPv4 address an endpoint binds, to beacon on: ``tcp://10.0.0.4:5000`` ->
    ``"10.0.0.4"``.  None (keep the configured default) when the endpoint names no one
    interface: every interface (``0.0.0.0``, an empty host, ``*``), a host name (it may
    resolve to several, or differently later), IPv6 (beacons are IPv4), a multicast or
    broadcast address, a socket path (``ipc://``, ``unix://``), or anything unparsable.
    Pure: no lookup, no socket."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in _HOST_PORT_SCHEMES:
        return None
    host, colon, port = rest.partition("/")[0].rpartition(":")
    if not colon or not port.isdigit():
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name, "", "*", "[::1]"
    if not isinstance(ip, ipaddress.IPv4Address) or ip.is_unspecified or ip.is_multicast \
            or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


__all__ = ["interface_for_endpoint"]
