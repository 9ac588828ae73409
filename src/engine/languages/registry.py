"""The language plugins a node knows: the built-in ones, then those other packages
register under the entry-point group ``engine.languages`` (docs/languages.md).  Read
once, when first asked; a plugin whose entry point cannot be loaded is left out, with
the reason kept for the error that names it."""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

from engine.languages.base import LanguagePlugin
from engine.languages.exec import ExecPlugin
from engine.languages.nodejs import NodePlugin
from engine.languages.python import PythonPlugin

log = logging.getLogger(__name__)

GROUP = "engine.languages"
_BUILT_IN: dict[str, type[LanguagePlugin]] = {
    "python": PythonPlugin, "exec": ExecPlugin, "nodejs": NodePlugin}
_plugins: dict[str, type[LanguagePlugin]] | None = None
broken: dict[str, str] = {}          # entry points that failed to load -> why


def plugins() -> dict[str, type[LanguagePlugin]]:
    global _plugins
    if _plugins is None:
        found = dict(_BUILT_IN)
        for ep in entry_points(group=GROUP):
            if ep.name in found:
                continue          # a built-in name is never replaced
            try:
                cls = ep.load()
            except Exception as exc:   # a broken plugin must not take the node down
                broken[ep.name] = f"{type(exc).__name__}: {exc}"
                log.error("language plugin %s (%s) cannot be loaded: %s", ep.name, ep.value, exc)
                continue
            if not (isinstance(cls, type) and issubclass(cls, LanguagePlugin)):
                broken[ep.name] = f"{ep.value} is not a LanguagePlugin subclass"
                continue
            found[ep.name] = cls
        _plugins = found
    return _plugins


def names() -> list[str]:
    return sorted(plugins())


def get(name: str) -> LanguagePlugin:
    """A fresh plugin for ``name`` (KeyError if none)."""
    return plugins()[name]()
