"""A driver's manifest entry: its :class:`DriverSpec`, and the validation of its options.

Drivers validate their manifest options with the helpers here so every mistake is a
:class:`engine.errors.ManifestError` naming the field path (``drivers.spool.path``)
and what was expected.  ``raw`` is the driver's manifest object; the keys the
manifest itself consumes (``type``, ``emit``) are ignored here.

:class:`DriverSpec` lives here rather than in :mod:`engine.manifest` (which re-exports
it) because the manifest validates driver options through the registry: the manifest
depends on the drivers, so the drivers must not depend on the manifest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from engine.errors import ManifestError

# Keys of a driver object that belong to the manifest, not to the driver.
COMMON_KEYS = frozenset({"type", "emit"})

_MISSING: Any = object()


@dataclass(frozen=True)
class DriverSpec:
    """One entry of a manifest's ``drivers`` (or ``tasks``), options already parsed."""

    name: str            # the key under "drivers"/"tasks"
    type: str            # canonical driver type, e.g. "recurring-timer"
    emit: str            # event name the driver's jobs carry
    options: Any         # the driver class's parsed, frozen options
    path: str = ""       # its field path in the manifest, e.g. "tasks.event" (for errors)


@dataclass(frozen=True)
class OptionContext:
    """Where options came from, for error messages and relative paths."""

    file: str          # the manifest file
    path: str          # field path of the driver, e.g. "drivers.spool"
    base_dir: Path     # the manifest's folder

    def error(self, field: str, expected: str, got: Any = None) -> ManifestError:
        return ManifestError(self.file, f"{self.path}.{field}" if field else self.path, expected, got)


def check_keys(raw: Any, ctx: OptionContext, allowed: Iterable[str]) -> dict[str, Any]:
    """``raw`` must be an object with no keys beyond ``allowed`` (typos fail loudly)."""
    if not isinstance(raw, dict):
        raise ctx.error("", "an object", raw)
    known = COMMON_KEYS | set(allowed)
    for key in raw:
        if key not in known:
            raise ctx.error(str(key), f"no such option (known: {', '.join(sorted(allowed)) or 'none'})", raw[key])
    return raw


def opt_number(raw: dict[str, Any], ctx: OptionContext, name: str, *, default: Any = _MISSING,
               minimum: float | None = None, integer: bool = False) -> Any:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ctx.error(name, "a number (required)")
    if value is default and default is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ctx.error(name, kind, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ctx.error(name, f"a finite {kind[2:]}", value)
    if minimum is not None and value < minimum:
        raise ctx.error(name, f"{kind} >= {minimum:g}", value)
    return value


def opt_str(raw: dict[str, Any], ctx: OptionContext, name: str, *, default: Any = _MISSING,
            choices: Iterable[str] | None = None) -> Any:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ctx.error(name, "a string (required)")
    if value is default and default is None:
        return None
    if not isinstance(value, str) or not value:
        raise ctx.error(name, "a non-empty string", value)
    if choices is not None and value not in choices:
        raise ctx.error(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def opt_bool(raw: dict[str, Any], ctx: OptionContext, name: str, *, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ctx.error(name, "true or false", value)
    return value


def parse_host_port(text: str, ctx: OptionContext, name: str) -> tuple[str, int]:
    """``host:port`` or ``tcp://host:port`` (port 0: the OS picks one; no host, or ``*``:
    every interface, ``0.0.0.0``, as docs/drivers.md says)."""
    body = text[len("tcp://"):] if text.startswith("tcp://") else text
    host, sep, port = body.rpartition(":")
    host = host.strip("[]")
    if sep and host in ("", "*"):
        host = "0.0.0.0"
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ctx.error(name, "host:port (e.g. 127.0.0.1:9000)", text)
    return host, int(port)


# Schemes whose address is host:port (ws/wss may add a path after it).
_HOST_PORT_SCHEMES = ("tcp", "tls+tcp", "nng+tcp", "ws", "wss")


def check_url(text: str, ctx: OptionContext, name: str) -> str:
    """Catch at manifest load what would otherwise fail only when the driver binds:
    ``scheme://host:port`` needs a port in 0..65535 (host may be empty: every
    interface); ``ipc://``, ``unix://``, ``inproc://``... need a path or name."""
    scheme, sep, rest = text.partition("://")
    if scheme in _HOST_PORT_SCHEMES:
        hostport = rest.split("/", 1)[0] if scheme in ("ws", "wss") else rest
        _host, colon, port = hostport.rpartition(":")
        if not colon or not port.isdigit() or int(port) > 65535:
            raise ctx.error(name, f"{scheme}://host:port with a port in 0-65535", text)
    elif not sep or not rest.strip("/"):
        raise ctx.error(name, f"{scheme}:// followed by a path", text)
    return text
