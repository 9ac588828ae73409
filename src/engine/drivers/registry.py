"""Driver types by name, and validation of their manifest options.

Each driver module registers a :class:`~engine.drivers.base.Driver` subclass with
:func:`register`; the class has ``parse_options(raw: dict, where: OptionContext) ->
frozen options`` which raises :class:`engine.errors.ManifestError` naming the field
path, and is constructed as ``cls(spec)`` where ``spec`` is the manifest's
:class:`~engine.drivers.options.DriverSpec`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from engine.drivers.base import Driver
from engine.drivers.options import DriverSpec, OptionContext

__all__ = ["BUILTIN_MODULES", "DriverSpec", "OptionContext", "canonical", "get", "known_types",
           "parse_options", "register"]

DriverT = TypeVar("DriverT", bound="type[Driver[Any]]")

_DRIVERS: dict[str, type[Driver[Any]]] = {}
_ALIASES: dict[str, str] = {}
# Modules that register built-in drivers when imported.
BUILTIN_MODULES: list[str] = [
    "engine.drivers.timers", "engine.drivers.cron", "engine.drivers.fsmonitor",
    "engine.drivers.nng_server", "engine.drivers.nng_sink", "engine.drivers.raw_socket",
    "engine.drivers.native", "engine.drivers.scheduler",
    "engine.drivers.mesh_responder", "engine.drivers.mesh_subscriber", "engine.drivers.mesh_publisher",
    "engine.drivers.nng_subscriber",
]


def register(name: str, *aliases: str) -> Callable[[DriverT], DriverT]:
    """Class decorator: the manifest's ``"type": name`` (or any alias) builds this class."""
    def deco(cls: DriverT) -> DriverT:
        _DRIVERS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        cls.type_name = name
        return cls
    return deco


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def canonical(type_name: str) -> str:
    return _ALIASES.get(type_name, type_name)


def get(type_name: str) -> type[Driver[Any]] | None:
    _load_builtins()
    return _DRIVERS.get(canonical(type_name))


def known_types() -> list[str]:
    _load_builtins()
    return sorted([*_DRIVERS, *_ALIASES])


def parse_options(type_name: str, raw: dict[str, Any], ctx: OptionContext) -> Any:
    cls = get(type_name)
    if cls is None:
        raise ctx.error("type", f"one of {', '.join(known_types()) or '(no drivers installed)'}", type_name)
    return cls.parse_options(raw, ctx)
