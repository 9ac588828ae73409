"""What the mesh drivers (``mesh-responder``, ``mesh-subscriber``, ``mesh-publisher``)
share: the options that place a mesh component (docs/mesh.md) and their validation.

Every mesh driver takes ``name`` (default: the app's name), ``namespace`` and ``key``
(default ``""``), ``secret`` or ``secret-env`` (the name of an environment variable of
the node holding it: a secret need not sit in the manifest), ``bind`` (where its data
socket listens, default ``127.0.0.1``: ``0.0.0.0`` to serve other hosts) and
``discovery``, an object of :class:`transport.mesh.discovery.DiscoveryConfig`'s fields
in manifest spelling (``port``, ``multicast-group``, ``broadcast``, ``interface``,
``peers``, ``hello-interval``, ``expiry``, ``ttl``, ``max-peers``, ``max-per-source``,
``max-skew``).  What ``discovery`` leaves out comes from the node's environment
(``MESH_PORT``, ``MESH_GROUP``, ``MESH_PEERS``...: ``DiscoveryConfig.from_env``, the
container recipe of docs/mesh.md), read when the driver starts.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from transport.mesh.discovery import DiscoveryConfig

from engine.drivers.options import OptionContext, opt_number, opt_str
from engine.errors import DriverError

# The keys every mesh driver takes (besides its own).
MESH_KEYS = ["name", "namespace", "key", "environment", "secret", "secret-env", "bind",
             "discovery"]

# ``discovery`` keys (manifest spelling) -> DiscoveryConfig fields, and their kind.
_DISCOVERY_FIELDS: dict[str, tuple[str, str]] = {
    "port": ("port", "int"),
    "multicast-group": ("multicast_group", "str-or-null"),
    "broadcast": ("broadcast", "str-or-null"),
    "interface": ("interface", "str"),
    "peers": ("peers", "peers"),
    "hello-interval": ("hello_interval", "number"),
    "expiry": ("expiry", "number"),
    "ttl": ("ttl", "int"),
    "max-peers": ("max_peers", "int"),
    "max-per-source": ("max_per_source", "int"),
    "max-skew": ("max_skew", "number"),
}


@dataclass(frozen=True)
class MeshPlace:
    """Where a driver's mesh component lives: its identity and how it finds peers."""

    name: str | None = None          # None: the app's name
    namespace: str = ""
    key: str = ""
    environment: str | None = None   # None: the node's MESH_ENVIRONMENT / COTE_ENV
    secret: str | None = None
    secret_env: str | None = None
    bind: str = "127.0.0.1"
    discovery: tuple[tuple[str, Any], ...] = ()   # DiscoveryConfig fields given in the manifest

    def component_kwargs(self, app_name: str) -> dict[str, Any]:
        """The keyword arguments of a mesh component (name included), resolved now:
        the secret from the environment, discovery from ``MESH_*`` plus the manifest's."""
        secret = self.secret
        if self.secret_env is not None:
            secret = os.environ.get(self.secret_env)
            if not secret:
                raise DriverError(f"secret-env: the environment variable {self.secret_env} is not set")
        try:
            discovery = DiscoveryConfig.from_env(**dict(self.discovery))
        except (ValueError, TypeError) as exc:  # a bad MESH_* variable of the node
            raise DriverError(f"discovery: {exc}") from None
        return {"name": self.name or app_name, "namespace": self.namespace, "key": self.key,
                "environment": self.environment, "secret": secret, "discovery": discovery,
                "bind": self.bind}

    def describe(self, app_name: str) -> dict[str, Any]:
        """For ``info()``: where it is (never the secret)."""
        return {"name": self.name or app_name, "namespace": self.namespace, "key": self.key,
                "signed": self.secret is not None or self.secret_env is not None}


def opt_text(raw: dict[str, Any], ctx: OptionContext, name: str, default: str = "") -> str:
    """A string that may be empty (a namespace, a key)."""
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise ctx.error(name, "a string", value)
    return value


def parse_place(raw: dict[str, Any], ctx: OptionContext) -> MeshPlace:
    """The :data:`MESH_KEYS` of ``raw`` (the caller checks the keys)."""
    name: str | None = opt_str(raw, ctx, "name", default=None)
    secret: str | None = None
    if raw.get("secret") not in (None, ""):
        secret = opt_str(raw, ctx, "secret")
    secret_env: str | None = opt_str(raw, ctx, "secret-env", default=None)
    if secret is not None and secret_env is not None:
        raise ctx.error("secret-env", "either secret or secret-env, not both", secret_env)
    environment: str | None = None
    if "environment" in raw:
        environment = opt_text(raw, ctx, "environment")
    return MeshPlace(name=name, namespace=opt_text(raw, ctx, "namespace"), key=opt_text(raw, ctx, "key"),
                     environment=environment,
                     secret=secret, secret_env=secret_env,
                     bind=opt_str(raw, ctx, "bind", default="127.0.0.1"),
                     discovery=parse_discovery(raw.get("discovery", {}), ctx))


def parse_discovery(raw: Any, ctx: OptionContext) -> tuple[tuple[str, Any], ...]:
    """``discovery``: DiscoveryConfig fields in manifest spelling, checked by building
    a DiscoveryConfig of them (its own checks: port range, hello-interval < expiry...)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ctx.error("discovery", "an object (port, interface, peers, multicast-group...)", raw)
    sub = OptionContext(ctx.file, f"{ctx.path}.discovery", ctx.base_dir)
    fields: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if key not in _DISCOVERY_FIELDS:
            raise sub.error(str(key), f"no such option (known: {', '.join(sorted(_DISCOVERY_FIELDS))})", value)
        field, kind = _DISCOVERY_FIELDS[key]
        if kind == "int":
            value = opt_number(raw, sub, key, minimum=0, integer=True)
        elif kind == "number":
            value = opt_seconds(raw, sub, key)
        elif kind == "str":
            value = _ipv4(raw, sub, key)
        elif kind == "str-or-null":
            value = None if value is None or value == "" else _ipv4(raw, sub, key)
        else:  # peers: "host[:port]" strings, or one comma-separated string
            if isinstance(value, str):
                value = [p.strip() for p in value.split(",") if p.strip()]
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise sub.error(key, "a list of \"host\" or \"host:port\" strings", value)
            value = tuple(value)
        fields.append((field, value))
    try:
        config = DiscoveryConfig(**dict(fields))
    except (ValueError, TypeError) as exc:
        raise sub.error("", f"valid discovery settings ({exc})", raw) from None
    if not 0 <= config.ttl <= 255:
        raise sub.error("ttl", "a multicast TTL from 0 to 255", config.ttl)
    for host, port in config.static_targets:
        if not 0 < port < 65536:
            raise sub.error("peers", "host or host:port with a port in 1-65535", f"{host}:{port}")
    return tuple(fields)


def opt_seconds(raw: dict[str, Any], ctx: OptionContext, name: str, *, default: Any = None,
                minimum: float = 0) -> float:
    """A finite number of seconds (an integer too big for a float is refused, not an
    OverflowError)."""
    value = opt_number(raw, ctx, name, minimum=minimum) if default is None else \
        opt_number(raw, ctx, name, default=default, minimum=minimum)
    try:
        return float(value)
    except OverflowError:
        raise ctx.error(name, "a number of seconds a float can hold", value) from None


def _ipv4(raw: dict[str, Any], ctx: OptionContext, name: str) -> str:
    """An IPv4 address, as discovery's sockets take it (a host name is not resolved)."""
    text: str = opt_str(raw, ctx, name)
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise ctx.error(name, "an IPv4 address, e.g. 127.0.0.1", text) from None
    return text


def parse_names(raw: dict[str, Any], ctx: OptionContext, name: str, *,
                required: bool) -> tuple[tuple[str, str | None], ...] | None:
    """Event types (patterns allowed: ``user.*``, ``**``) as a list, each mapped to None
    (the driver decides the job's event), or an object mapping each to an event name.
    None when absent and not ``required``."""
    value = raw.get(name)
    if value is None:
        if required:
            raise ctx.error(name, "a list of event types, or an object {type: event} (required)")
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(t, str) and t for t in value):
            raise ctx.error(name, "a non-empty list of event types (non-empty strings)", value)
        return tuple((t, None) for t in dict.fromkeys(value))
    if isinstance(value, dict):
        if not value or not all(isinstance(t, str) and t and isinstance(e, str) and e
                                for t, e in value.items()):
            raise ctx.error(name, "a non-empty object mapping event types to event names", value)
        return tuple(value.items())
    raise ctx.error(name, "a list of event types, or an object {type: event}", value)
