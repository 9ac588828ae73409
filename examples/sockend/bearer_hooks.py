"""Hooks for a public-facing Sockend: a bearer token per browser, rooms per user.

    python -m sockend --port 5555 --static examples/sockend \\
        --hooks examples/sockend/bearer_hooks.py:BearerHooks

A browser presents its token in Socket.IO's auth payload
(``io("/", {auth: {token: "..."}})``), in an ``Authorization: Bearer ...`` header
(Node and Python clients can set headers), or as ``?token=`` (Sockend's own
websocket: browsers cannot set headers on a websocket).  A wrong or missing token is
refused before the browser reaches the mesh.  Each user joins the room ``user:NAME``,
so a Publisher reaches one user's pages with ``{"__room": "user:ann", ...}``; every
request reaches the Responders with ``user`` set from the token, whatever the page
sent, and ``admin*`` requests only from admins.

The tokens come from ``SOCKEND_TOKENS`` (``token=user[:admin],...``) here; a real
bridge would check a signed token or ask a session store.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any

from sockend.hooks import BridgeHooks, Browser, Forbidden, Handshake


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


def tokens_from_env(spec: str | None = None) -> dict[str, User]:
    out: dict[str, User] = {}
    for item in (spec if spec is not None else os.environ.get("SOCKEND_TOKENS", "")).split(","):
        token, _, who = item.strip().partition("=")
        if token and who:
            name, _, role = who.partition(":")
            out[token] = User(name, role == "admin")
    return out


class BearerHooks(BridgeHooks):
    def __init__(self, tokens: dict[str, User] | None = None) -> None:
        self.tokens = tokens if tokens is not None else tokens_from_env()

    def _token(self, hs: Handshake) -> str:
        if isinstance(hs.auth, dict) and isinstance(hs.auth.get("token"), str):
            return hs.auth["token"]
        scheme, _, value = hs.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return value.strip()
        return hs.query.get("token", "")

    async def authenticate(self, handshake: Handshake) -> User:
        token = self._token(handshake)
        for known, user in self.tokens.items():
            if token and hmac.compare_digest(token.encode(), known.encode()):
                return user
        raise Forbidden("a valid bearer token is required")

    async def joined(self, browser: Browser) -> None:
        browser.join(f"user:{browser.identity.name}")

    async def transform(self, request: dict[str, Any], browser: Browser) -> dict[str, Any]:
        user: User = browser.identity
        if request["type"].startswith("admin") and not user.admin:
            raise Forbidden(f"{request['type']} is for admins")
        return {**request, "user": user.name}
