"""Hooks for a public-facing bridge: who may connect, what each browser may ask, which
rooms it is in.  The same hooks serve both protocols (Socket.IO and Sockend's own).

A :class:`BridgeHooks` subclass overrides what it needs; each method may be plain or
``async``:

- :meth:`~BridgeHooks.authenticate` sees the :class:`Handshake` (headers, query,
  cookies, the Socket.IO ``auth`` payload, the peer) of each namespace a browser joins,
  and returns an *identity* (any value, kept as ``browser.identity``) or raises
  :class:`~transport.errors.Forbidden` to refuse it (Socket.IO: a ``connect_error``
  with the message; Sockend's protocol: HTTP 403);
- :meth:`~BridgeHooks.joined` runs once the browser is in; ``browser.join(room)`` puts
  it in rooms (events published with ``__room``/``__rooms`` reach only their members);
- :meth:`~BridgeHooks.transform` sees every request and every published event before
  it reaches the mesh (cote's ``requesterTransformators``): it returns the request to
  send (add session data from ``browser.identity``), or raises ``Forbidden``, which
  the browser gets as its error (code ``forbidden``).  It may also join or leave rooms.

``load_hooks("package.module:Name")`` or ``load_hooks("path/to/file.py:Name")`` loads
hooks for the command line (``--hooks``): ``Name`` is a subclass (instantiated with no
arguments) or an instance.  ``examples/sockend/bearer_hooks.py`` checks a bearer token.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping
from urllib.parse import parse_qsl

from transport.errors import Forbidden

__all__ = ["Browser", "BridgeHooks", "Forbidden", "Handshake", "load_hooks", "call_hook"]

MAX_ROOMS = 256
MAX_ROOM_LENGTH = 256


@dataclass(frozen=True)
class Handshake:
    """What a browser sent when it connected to one namespace."""
    protocol: Literal["socket.io", "sockend"]
    namespace: str                          # the mesh namespace ("" is the default one)
    headers: Mapping[str, str]              # lower-case names
    query: Mapping[str, str]
    cookies: Mapping[str, str]
    auth: Any = None                        # Socket.IO's auth payload (None: none sent)
    remote: str = ""                        # "host:port" of the peer

    @staticmethod
    def build(protocol: Literal["socket.io", "sockend"], namespace: str, headers: Mapping[str, str],
              target: str, auth: Any = None, remote: str = "") -> "Handshake":
        query = target.split("?", 1)[1] if "?" in target else ""
        return Handshake(protocol, namespace, MappingProxyType(dict(headers)),
                         MappingProxyType(dict(parse_qsl(query, keep_blank_values=True))),
                         MappingProxyType(_cookies(headers.get("cookie", ""))), auth, remote)


def _cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


@dataclass(eq=False)
class Browser:
    """One browser in one namespace, as hooks see it."""
    handshake: Handshake
    identity: Any = None
    rooms: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.handshake.namespace

    def join(self, room: str) -> None:
        if not isinstance(room, str) or not 0 < len(room) <= MAX_ROOM_LENGTH:
            raise ValueError(f"a room is a string of 1-{MAX_ROOM_LENGTH} characters")
        if room not in self.rooms and len(self.rooms) >= MAX_ROOMS:
            raise ValueError(f"a browser is in at most {MAX_ROOMS} rooms")
        self.rooms.add(room)

    def leave(self, room: str) -> None:
        self.rooms.discard(room)


class BridgeHooks:
    """The defaults: everyone may connect, no rooms, requests pass unchanged."""

    def authenticate(self, handshake: Handshake) -> Any:
        return None

    def joined(self, browser: Browser) -> Any:
        return None

    def transform(self, request: dict[str, Any], browser: Browser) -> Any:
        return request


async def call_hook(result: Any) -> Any:
    """A hook's result, awaited when the hook is ``async``."""
    if inspect.isawaitable(result):
        return await result
    return result


def load_hooks(spec: str) -> BridgeHooks:
    """``module.path:Name`` or ``file.py:Name``; ValueError says what is wrong."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--hooks {spec!r}: expected module.path:Name or path/to/file.py:Name")
    try:
        if where.endswith(".py"):
            path = Path(where)
            loaded = importlib.util.spec_from_file_location(f"sockend_hooks_{path.stem}", path)
            if loaded is None or loaded.loader is None or not path.is_file():
                raise ValueError(f"--hooks {spec!r}: no file {where}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[loaded.name] = module    # (dataclasses look their module up there)
            try:
                loaded.loader.exec_module(module)
            except BaseException:
                del sys.modules[loaded.name]
                raise
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise ValueError(f"--hooks {spec!r}: cannot import {where}: {exc}") from None
    obj = getattr(module, name, None)
    if obj is None:
        raise ValueError(f"--hooks {spec!r}: {where} has no {name}")
    if isinstance(obj, type) and issubclass(obj, BridgeHooks):
        return obj()
    if isinstance(obj, BridgeHooks):
        return obj
    raise ValueError(f"--hooks {spec!r}: {name} is not a BridgeHooks subclass or instance")
