"""Which pages may open a websocket to Sockend: pure, no I/O.

A browser lets any page open a websocket to any address, its own origin or not, and
sends the page's origin along (``Origin: https://evil.example``); nothing else stops a
page of another site, opened by someone on the LAN (or on this machine, for a loopback
bind), from calling the mesh with that visitor's network position.  So a websocket
upgrade is accepted only from:

- the *same origin*: the Origin's host and port are the request's ``Host`` (a page
  Sockend served itself, through ``--static``, or any page of the same host and port,
  whatever proxy stands in front);
- an origin of the allow-list (``SockendConfig.allowed_origins``, ``--allow-origin``),
  compared exactly after normalising case and default ports; ``*`` allows every origin
  (the check is off);
- no Origin at all: only browsers send one, and they always do on a websocket upgrade,
  so a request without it comes from a program (a test, a script, a server), which
  could write any Origin it liked: refusing it would protect nobody.

``null`` (sandboxed frames, ``file:`` pages, some redirects) is never the same origin and
cannot be listed: any page can make itself ``null``.  The Host comparison cannot stop DNS
rebinding (a hostile name that resolves to this host: its Origin and Host agree); a
Sockend reachable that way should be behind a proxy that checks Host (docs/sockend.md).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

ANY_ORIGIN = "*"
# What browsers send (host names in ASCII, punycode for the others); stricter than
# urlsplit, which reads "x[::1]" as the host "::1".
_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::([0-9]{1,5}))?", re.ASCII)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_MAX_SHOWN = 120   # characters of a refused Origin quoted back


@dataclass(frozen=True, slots=True)
class Origin:
    """A browser origin, normalised: lower-case scheme and host, the port explicit."""
    scheme: str
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None or _DEFAULT_PORTS.get(self.scheme) == self.port:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


def parse_origin(text: str) -> Origin:
    """``scheme://host[:port]`` (what a browser sends in Origin) or ValueError saying what
    was expected.  No path, query, user or password: an origin has none."""
    match = _ORIGIN.fullmatch(text) if isinstance(text, str) else None
    hostport = _host_port(match.group(2)) if match else None
    if match is None or hostport is None:
        raise ValueError("an origin of a scheme, a host and an optional port "
                         f"(https://app.example.com:8443), got {text!r:.{_MAX_SHOWN}}")
    scheme = match.group(1).lower()
    host, port = hostport
    return Origin(scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme))


def _host_port(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a name, an IPv4 address or a bracketed IPv6 one) as the host in
    lower case (IPv6 compressed, without brackets) and the port, or None if it is not."""
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    host, port = match.group(1).lower(), match.group(2)
    if host.startswith("["):
        try:
            host = ipaddress.IPv6Address(host[1:-1]).compressed
        except ValueError:
            return None
    if port is not None and int(port) > 65535:
        return None
    return host, int(port) if port is not None else None


def _host_matches(origin: Origin, host: str) -> bool:
    """Whether a Host header names the origin's host and port (a Host without a port has
    the origin scheme's default one)."""
    hostport = _host_port(host)
    if hostport is None:
        return False
    name, port = hostport
    if port is None:
        port = _DEFAULT_PORTS.get(origin.scheme)
    return name == origin.host and port == origin.port


@dataclass(frozen=True)
class OriginPolicy:
    """``OriginPolicy(("https://app.example.com",)).refusal(origin, host)``: why an
    upgrade with these headers is refused, or None.  ``allowed`` is checked (ValueError
    naming the bad entry) and kept normalised."""
    allowed: tuple[str, ...] = ()
    _origins: frozenset[Origin] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if isinstance(self.allowed, str):
            raise ValueError("allowed origins must be a list of origins, not one string")
        normal = []
        for entry in self.allowed:
            if entry == ANY_ORIGIN:
                normal.append(ANY_ORIGIN)
                continue
            if isinstance(entry, str) and entry.strip().lower() == "null":
                raise ValueError("allowed origins: 'null' cannot be allowed (any page can make "
                                 "its origin null); use '*' to allow every origin")
            try:
                normal.append(str(parse_origin(entry)))
            except ValueError as exc:
                raise ValueError(f"allowed origins: expected {exc}") from None
        object.__setattr__(self, "allowed", tuple(dict.fromkeys(normal)))
        object.__setattr__(self, "_origins", frozenset(parse_origin(o) for o in normal if o != ANY_ORIGIN))

    @property
    def any(self) -> bool:
        return ANY_ORIGIN in self.allowed

    def refusal(self, origin: str | None, host: str | None) -> str | None:
        """None if a websocket upgrade with this ``Origin`` (None: no header) and
        ``Host`` header may proceed, else the reason to send with the 403."""
        if origin is None or self.any:
            return None
        try:
            parsed = parse_origin(origin)
        except ValueError:
            return f"origin {origin!r:.{_MAX_SHOWN}} is not allowed (not a single origin)"
        if parsed in self._origins:
            return None
        if host is not None and _host_matches(parsed, host):
            return None
        return (f"origin {origin!r:.{_MAX_SHOWN}} is not allowed: not the same origin as "
                f"host {host!r:.{_MAX_SHOWN}}, nor allowed (--allow-origin)")
