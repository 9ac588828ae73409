"""Driver types by name, and validation of their manifest options.

Each driver module registers a class with :func:`register`; the class has
``parse_options(raw: dict, where: OptionContext) -> frozen options`` which raises
:class:`engine.errors.ManifestError` naming the field path, and is constructed as
``cls(spec)`` where ``spec`` is the manifest's :class:`engine.manifest.DriverSpec`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.errors import ManifestError

_DRIVERS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
# Modules that register built-in drivers when imported.
BUILTIN_MODULES: list[str] = [
    "engine.drivers.timers", "engine.drivers.cron", "engine.drivers.fsmonitor",
    "engine.drivers.nng_server", "engine.drivers.nng_sink", "engine.drivers.raw_socket",
    "engine.drivers.native", "engine.drivers.scheduler",
]


@dataclass(frozen=True)
class OptionContext:
    """Where options came from, for error messages and relative paths."""

    file: str          # the manifest file
    path: str          # field path of the driver, e.g. "drivers.spool"
    base_dir: Path     # the manifest's folder

    def error(self, field: str, expected: str, got: Any = None) -> ManifestError:
        return ManifestError(self.file, f"{self.path}.{field}" if field else self.path, expected, got)


def register(name: str, *aliases: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
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


def get(type_name: str) -> type | None:
    _load_builtins()
    return _DRIVERS.get(canonical(type_name))


def known_types() -> list[str]:
    _load_builtins()
    return sorted([*_DRIVERS, *_ALIASES])


def parse_options(type_name: str, raw: dict, ctx: OptionContext) -> Any:
    cls = get(type_name)
    if cls is None:
        raise ctx.error("type", f"one of {', '.join(known_types()) or '(no drivers installed)'}", type_name)
    return cls.parse_options(raw, ctx)
